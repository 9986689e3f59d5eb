//! LoRA files folded into a loaded UNet ([`super::LoadOptions::loras`]): the diffusers/PEFT
//! format (`unet.<module>.lora_A.weight` / `lora_B.weight`, scale `alpha / r` from the
//! metadata) and the older diffusers names (`lora.down` / `lora.up`). Folding happens once at
//! load, so inference costs nothing extra.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::models::nn::Lora;
use crate::models::UNet2DConditionModel;
use crate::{Error, Result};

/// The file name diffusers uses.
pub const LORA_FILE: &str = "pytorch_lora_weights.safetensors";

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
