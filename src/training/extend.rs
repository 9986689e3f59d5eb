//! `ip2p extend`: a Stable Diffusion folder becomes an InstructPix2Pix starting point.
//!
//! The UNet's `conv_in` grows from 4 to 8 input channels: the first 4 keep their weights, the 4
//! new ones (the input image's latents) start at zero, and the bias is kept (diffusers'
//! training script leaves it freshly initialised, so its extended model starts out computing
//! something else). The extended model therefore computes exactly what the original did, for any
//! image latents. `model_index.json` names the InstructPix2Pix pipeline and the scheduler becomes
//! Euler ancestral, as in the published model.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::loader::{read_json, ModelDir};
use crate::{Error, Result};

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::io(path, e)
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let s = serde_json::to_string_pretty(v).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    std::fs::write(path, s + "\n").map_err(io(path))
}

/// Widens `conv_in.weight` `[out, 4, k, k]` to `[out, 8, k, k]` with zeros; everything else
/// (the bias included) is kept as is, in its own dtype.
pub fn extend_unet_tensors(
    tensors: &mut HashMap<String, Tensor>,
    new_in: usize,
) -> Result<Option<(usize, usize)>> {
    let Some(w) = tensors.get("conv_in.weight") else {
        return Ok(None);
    };
    let (out, inp, kh, kw) = w.dims4()?;
    if inp >= new_in {
        return Err(Error::IncompatibleModel(format!(
            "conv_in already has {inp} input channels (≥ {new_in})"
        )));
    }
    let zeros = Tensor::zeros((out, new_in - inp, kh, kw), w.dtype(), w.device())?;
    let wide = Tensor::cat(&[w, &zeros], 1)?;
    tensors.insert("conv_in.weight".into(), wide);
    Ok(Some((inp, new_in)))
}

/// Extends `src` into a new folder `out` (which must not exist or be empty).
pub fn extend(src: &ModelDir, out: &Path) -> Result<()> {
    let ucfg: Value = src.config("unet", "config.json")?;
    let in_ch = ucfg.get("in_channels").and_then(Value::as_u64).unwrap_or(4) as usize;
    if in_ch != 4 {
        return Err(Error::IncompatibleModel(format!(
            "{}: the UNet has {in_ch} input channels; extend starts from a Stable Diffusion UNet with 4",
            src.root().display()
        )));
    }
    if out.exists() && std::fs::read_dir(out).map_err(io(out))?.next().is_some() {
        return Err(Error::invalid(
            "out",
            format!("{} exists and is not empty", out.display()),
        ));
    }
    // Built beside the target and renamed into place at the end: no half-made model on failure.
    crate::fsutil::commit_dir(out, |tmp| build(src, tmp, ucfg))
}

fn build(src: &ModelDir, dst: &Path, mut ucfg: Value) -> Result<()> {
    let root = src.root();
    super::copy_model_except_unet(root, dst, false)?;

    // The UNet: every safetensors file (variants and shards) gets the wider conv_in.
    let su = root.join("unet");
    let du = dst.join("unet");
    std::fs::create_dir_all(&du).map_err(io(&du))?;
    let mut widened = 0;
    for entry in std::fs::read_dir(&su).map_err(io(&su))? {
        let entry = entry.map_err(io(&su))?;
        let p = entry.path();
        let fname = entry.file_name().to_string_lossy().into_owned();
        if fname == "config.json" {
            continue;
        }
        if fname.ends_with(".safetensors") {
            let mut t = candle_core::safetensors::load(&p, &Device::Cpu)
                .map_err(|e| Error::IncompatibleModel(format!("{}: {e}", p.display())))?;
            if extend_unet_tensors(&mut t, 8)?.is_some() {
                widened += 1;
            }
            candle_core::safetensors::save(&t, du.join(&fname))?;
        } else if fname.ends_with(".bin") {
            return Err(Error::IncompatibleModel(format!(
                "{}: PyTorch .bin weights; convert the UNet to safetensors first",
                p.display()
            )));
        } else if p.is_file() {
            std::fs::copy(&p, du.join(&fname)).map_err(io(&p))?;
        }
    }
    if widened == 0 {
        return Err(Error::MissingFile {
            dir: root.to_path_buf(),
            file: "unet/*.safetensors holding conv_in.weight".into(),
        });
    }
    ucfg["in_channels"] = Value::from(8);
    write_json(&du.join("config.json"), &ucfg)?;

    let mut index: Value = read_json(&root.join("model_index.json"))?;
    index["_class_name"] = Value::from("StableDiffusionInstructPix2PixPipeline");
    index["scheduler"] = serde_json::json!(["diffusers", "EulerAncestralDiscreteScheduler"]);
    write_json(&dst.join("model_index.json"), &index)?;

    let sp = root.join("scheduler").join("scheduler_config.json");
    let old: Value = if sp.is_file() {
        read_json(&sp)?
    } else {
        Value::Object(Default::default())
    };
    let keep = |k: &str, d: Value| old.get(k).cloned().unwrap_or(d);
    let sched = serde_json::json!({
        "_class_name": "EulerAncestralDiscreteScheduler",
        "beta_end": keep("beta_end", 0.012.into()),
        "beta_schedule": keep("beta_schedule", "scaled_linear".into()),
        "beta_start": keep("beta_start", 0.00085.into()),
        "num_train_timesteps": keep("num_train_timesteps", 1000.into()),
        "prediction_type": keep("prediction_type", "epsilon".into()),
        "steps_offset": keep("steps_offset", 1.into()),
        "trained_betas": keep("trained_betas", Value::Null),
    });
    let sd = dst.join("scheduler");
    std::fs::create_dir_all(&sd).map_err(io(&sd))?;
    write_json(&sd.join("scheduler_config.json"), &sched)
}
