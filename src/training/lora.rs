//! LoRA adapters on the UNet's attention projections (`to_q`, `to_k`, `to_v`, `to_out.0`), as
//! diffusers' LoRA training scripts place them, saved in the diffusers/PEFT format
//! (`pytorch_lora_weights.safetensors`, keys `unet.<module>.lora_A.weight` / `lora_B.weight`)
//! and folded into the weights at load time, so inference costs nothing extra.

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

/// The file name diffusers uses.
pub const LORA_FILE: &str = "pytorch_lora_weights.safetensors";

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
/// layout, with rank and alpha in the metadata.
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
                .map_err(|e| Error::invalid("lora", e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(tv, Some(meta), path)
        .map_err(|e| Error::invalid("lora", format!("{}: {e}", path.display())))
}

/// Adapters by module path: `(A, B)`.
pub type Adapters = HashMap<String, (Tensor, Tensor)>;

/// Reads a LoRA file: adapters by module path, and the scale (`alpha / r` from the metadata,
/// else 1 as diffusers' scripts train with `alpha = r`).
pub fn read(path: &Path) -> Result<(Adapters, f64)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::IncompatibleModel(format!("{}: {e}", path.display())))?;
    let mut scale = 1.0;
    if let Some(m) = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("lora_adapter_metadata"))
    {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(m) {
            if let (Some(r), Some(a)) = (v["unet.r"].as_f64(), v["unet.lora_alpha"].as_f64()) {
                if r > 0.0 {
                    scale = a / r;
                }
            }
        }
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
    let mut out: HashMap<String, (Option<Tensor>, Option<Tensor>)> = HashMap::new();
    for (k, t) in tensors {
        let k = k.strip_prefix("unet.").unwrap_or(&k).to_owned();
        // PEFT (`lora_A`/`lora_B`) and the older diffusers names (`lora.down`/`lora.up`).
        let (module, is_a) = if let Some(m) = k.strip_suffix(".lora_A.weight") {
            (m.to_owned(), true)
        } else if let Some(m) = k.strip_suffix(".lora_B.weight") {
            (m.to_owned(), false)
        } else if let Some(m) = k.strip_suffix(".lora.down.weight") {
            (
                m.replace(".processor", "")
                    .replace("to_out_lora", "to_out.0"),
                true,
            )
        } else if let Some(m) = k.strip_suffix(".lora.up.weight") {
            (
                m.replace(".processor", "")
                    .replace("to_out_lora", "to_out.0"),
                false,
            )
        } else {
            continue;
        };
        let e = out.entry(module).or_default();
        if is_a {
            e.0 = Some(t);
        } else {
            e.1 = Some(t);
        }
    }
    let mut pairs = HashMap::new();
    for (m, (a, b)) in out {
        match (a, b) {
            (Some(a), Some(b)) => {
                pairs.insert(m, (a, b));
            }
            _ => {
                return Err(Error::IncompatibleModel(format!(
                    "{}: {m} has only half of its adapter",
                    path.display()
                )))
            }
        }
    }
    Ok((pairs, scale))
}

/// Folds a LoRA file into the UNet's weights. Returns how many projections changed; an
/// adapter for a module the UNet does not have is an error.
pub fn merge_file(unet: &mut UNet2DConditionModel, path: &Path) -> Result<usize> {
    let (mut pairs, scale) = read(path)?;
    let mut n = 0;
    let mut err = None;
    unet.visit_attention_projections(&mut |p, lin| {
        if let Some((a, b)) = pairs.remove(p) {
            let r = (|| -> Result<()> {
                let dev = lin.device().clone();
                let l = Lora {
                    a: a.to_device(&dev)?.to_dtype(DType::F32)?,
                    b: b.to_device(&dev)?.to_dtype(DType::F32)?,
                    scale,
                };
                lin.merge_lora(&l)?;
                Ok(())
            })();
            match r {
                Ok(()) => n += 1,
                Err(e) => err = Some(e),
            }
        }
    });
    if let Some(e) = err {
        return Err(e);
    }
    if let Some(k) = pairs.keys().next() {
        return Err(Error::IncompatibleModel(format!(
            "{}: the UNet has no attention projection {k}",
            path.display()
        )));
    }
    Ok(n)
}
