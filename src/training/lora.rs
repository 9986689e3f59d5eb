//! Training LoRA adapters on the UNet's attention projections (`to_q`, `to_k`, `to_v`,
//! `to_out.0`), as diffusers' LoRA training scripts place them, saved in the diffusers/PEFT
//! format (`pytorch_lora_weights.safetensors`, keys `unet.<module>.lora_A.weight` /
//! `lora_B.weight`). Reading and folding them into a model is the loader's
//! ([`crate::loader::lora`]).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand_core::RngCore;

use super::data::{rng_for, unit};
use crate::models::nn::Lora;
use crate::models::UNet2DConditionModel;
use crate::{Error, Result};

/// The adapters' shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    /// Scale is `alpha / rank`; diffusers' scripts default `alpha` to the rank.
    pub alpha: f64,
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

pub use crate::loader::lora::{merge_file, read, Adapters, LORA_FILE};

/// Attaches fresh adapters to every attention projection: `A` from PEFT's default
/// Kaiming-uniform (bound `1/√in`), `B` zero, so the model starts out unchanged. Returns the
/// trainable variables, named as in the saved file without the `unet.` prefix.
pub fn attach(
    unet: &mut UNet2DConditionModel,
    cfg: LoraConfig,
    seed: u64,
    device: &Device,
    existing: Option<&HashMap<String, Tensor>>,
) -> Result<Vec<(String, Var)>> {
    let mut vars = Vec::new();
    let mut err = None;
    let mut k = 0u64;
    unet.visit_attention_projections(&mut |path, lin| {
        if err.is_some() {
            return;
        }
        let r = (|| -> Result<()> {
            let (out, inp) = lin.dims()?;
            let an = format!("{path}.lora_A.weight");
            let bn = format!("{path}.lora_B.weight");
            let (a, b) = match existing {
                Some(m) => (
                    m.get(&an).cloned().ok_or_else(|| {
                        Error::IncompatibleModel(format!("no {an} in the LoRA state"))
                    })?,
                    m.get(&bn).cloned().ok_or_else(|| {
                        Error::IncompatibleModel(format!("no {bn} in the LoRA state"))
                    })?,
                ),
                None => {
                    let mut rng = rng_for(seed, b"lora_ini", k);
                    let bound = 1.0 / (inp as f64).sqrt();
                    let v: Vec<f32> = (0..cfg.rank * inp)
                        .map(|_| ((2.0 * unit(&mut rng) - 1.0) * bound) as f32)
                        .collect();
                    let _ = rng.next_u32();
                    (
                        Tensor::from_vec(v, (cfg.rank, inp), device)?,
                        Tensor::zeros((out, cfg.rank), DType::F32, device)?,
                    )
                }
            };
            let a = Var::from_tensor(&a.to_dtype(DType::F32)?)?;
            let b = Var::from_tensor(&b.to_dtype(DType::F32)?)?;
            lin.set_lora(Some(Lora {
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
                scale: cfg.scale(),
            }));
            vars.push((an, a));
            vars.push((bn, b));
            k += 1;
            Ok(())
        })();
        if let Err(e) = r {
            err = Some(e);
        }
    });
    if let Some(e) = err {
        return Err(e);
    }
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(vars)
}

/// Writes adapters (`name → tensor`, names without the `unet.` prefix) in the diffusers/PEFT
/// layout, with rank and alpha in the metadata; the file is replaced whole.
pub fn save(tensors: &HashMap<String, Tensor>, cfg: LoraConfig, path: &Path) -> Result<()> {
    let prefixed: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| (format!("unet.{k}"), v.clone()))
        .collect();
    let meta = HashMap::from([
        ("format".to_owned(), "pt".to_owned()),
        (
            "lora_adapter_metadata".to_owned(),
            // diffusers reads this as the adapter's PEFT `LoraConfig`.
            serde_json::json!({
                "unet.r": cfg.rank,
                "unet.lora_alpha": cfg.alpha,
                "unet.target_modules": ["to_k", "to_q", "to_v", "to_out.0"],
                "unet.init_lora_weights": true,
                "unet.use_dora": false,
            })
            .to_string(),
        ),
    ]);
    let views: Vec<(String, Tensor)> = prefixed.into_iter().collect();
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = views
        .iter()
        .map(|(k, t)| {
            let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            Ok((k.clone(), b, t.dims().to_vec()))
        })
        .collect::<Result<_>>()?;
    let tv = bytes
        .iter()
        .map(|(k, b, s)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|v| (k.as_str(), v))
                .map_err(|e| Error::Internal(format!("LoRA tensor: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(tv, Some(meta))
        .map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?;
    crate::fsutil::write_file(path, &bytes)
}
