//! A new InstructPix2Pix folder from parts (`ip2p assemble`), and a shippable half-precision
//! copy of a folder (`ip2p package`).
//!
//! `assemble` takes the tokenizer, text encoder and scheduler of one folder, a trained `vae/`
//! (its `scaling_factor` measured on the data: one over the standard deviation of the latents)
//! and a fresh 8-channel UNet of any diffusers config, initialised as PyTorch initialises its
//! layers. `ip2p train` then trains that UNet.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

use super::data::{Columns, PairDataset};
use super::{copy_tree, init_default, named_vars, var_builder};
use crate::loader::{self, ModelDir};
use crate::models::{UNet2DConditionModel, UNetConfig};
use crate::pipeline::image::to_tensor;
use crate::{Error, Result};

/// What `assemble` builds from.
#[derive(Debug, Clone)]
pub struct AssembleConfig {
    /// A folder whose `tokenizer/`, `text_encoder/`, `scheduler/` and `model_index.json` are
    /// taken.
    pub text_from: PathBuf,
    /// A trained diffusers `vae/` folder.
    pub vae: PathBuf,
    /// The UNet's diffusers `config.json` (8 input channels).
    pub unet_config: PathBuf,
    /// Pictures to measure the latents' scale on.
    pub data: Vec<PathBuf>,
    pub columns: Columns,
    /// Rows of `data` measured (both pictures of each).
    pub scale_rows: usize,
    pub seed: u64,
    pub out: PathBuf,
}

/// Builds the folder; returns the VAE scaling factor it measured.
pub fn assemble(cfg: &AssembleConfig) -> Result<f64> {
    let ucfg: UNetConfig = loader::read_json(&cfg.unet_config)?;
    if ucfg.in_channels != 8 {
        return Err(Error::IncompatibleModel(format!(
            "the UNet config has {} input channels; InstructPix2Pix needs 8",
            ucfg.in_channels
        )));
    }
    let scale = latent_scale(cfg)?;
    crate::fsutil::commit_dir(&cfg.out, |tmp| {
        for part in ["tokenizer", "text_encoder", "scheduler"] {
            copy_tree(&cfg.text_from.join(part), &tmp.join(part), false, &[])?;
        }
        let index = cfg.text_from.join("model_index.json");
        std::fs::copy(&index, tmp.join("model_index.json")).map_err(|e| Error::io(&index, e))?;
        copy_tree(&cfg.vae, &tmp.join("vae"), false, &[])?;
        let vae_cfg = tmp.join("vae/config.json");
        let mut json: serde_json::Value = loader::read_json(&vae_cfg)?;
        json["scaling_factor"] = serde_json::json!(scale);
        write_json(&vae_cfg, &json)?;
        fresh_unet(&ucfg, cfg, &tmp.join("unet"))
    })?;
    Ok(scale)
}

/// One over the standard deviation of the VAE's latent modes of the first rows' pictures.
fn latent_scale(cfg: &AssembleConfig) -> Result<f64> {
    let dev = Device::Cpu;
    let vae_cfg = loader::read_json(&cfg.vae.join("config.json"))?;
    let files = [cfg.vae.join("diffusion_pytorch_model.safetensors")];
    let vb = loader::var_builder(&files, DType::F32, &dev)?;
    let vae = crate::models::AutoencoderKL::new(vb, &vae_cfg)?;
    let data = PairDataset::open(&cfg.data, cfg.columns.clone())?;
    let (mut sum, mut sum2, mut n) = (0f64, 0f64, 0usize);
    for row in 0..cfg.scale_rows.min(data.len()) {
        let pair = data.get(row)?;
        for img in [&pair.original, &pair.edited] {
            let z = vae.encode(&to_tensor(img, &dev)?)?.mean;
            let v: Vec<f32> = z.flatten_all()?.to_vec1()?;
            sum += v.iter().map(|&x| f64::from(x)).sum::<f64>();
            sum2 += v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>();
            n += v.len();
        }
    }
    if n == 0 {
        return Err(Error::invalid(
            "data",
            "no pictures to measure the latents on",
        ));
    }
    let var = sum2 / n as f64 - (sum / n as f64).powi(2);
    Ok(1.0 / var.max(1e-12).sqrt())
}

/// `unet/`: the config as given and weights drawn from `cfg.seed`.
fn fresh_unet(ucfg: &UNetConfig, cfg: &AssembleConfig, dst: &Path) -> Result<()> {
    let dev = Device::Cpu;
    let map = VarMap::new();
    UNet2DConditionModel::new(var_builder(&map, &dev), ucfg)
        .map_err(|e| Error::IncompatibleModel(format!("unet: {e}")))?;
    init_default(&map, cfg.seed, b"unetinit")?;
    let weights: HashMap<String, Tensor> = named_vars(&map)?
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().detach()))
        .collect();
    std::fs::create_dir_all(dst).map_err(|e| Error::io(dst, e))?;
    std::fs::copy(&cfg.unet_config, dst.join("config.json"))
        .map_err(|e| Error::io(&cfg.unet_config, e))?;
    candle_core::safetensors::save(&weights, dst.join("diffusion_pytorch_model.safetensors"))?;
    Ok(())
}

/// A copy of the model folder `src` at `dst` with every weight file as its half-precision
/// variant (`*.fp16.safetensors`, float tensors as f16), for shipping. Other files are copied;
/// `training_state/` folders are left out.
pub fn package_half(src: &Path, dst: &Path) -> Result<()> {
    ModelDir::from_dir(src)?;
    crate::fsutil::commit_dir(dst, |tmp| half_tree(src, tmp))
}

fn half_tree(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst).map_err(|e| Error::io(dst, e))?;
    for entry in std::fs::read_dir(src).map_err(|e| Error::io(src, e))? {
        let from = entry.map_err(|e| Error::io(src, e))?.path();
        let name = from.file_name().map(|n| n.to_string_lossy().into_owned());
        let Some(name) = name else { continue };
        if from.is_dir() {
            if name != "training_state" && name != "samples" {
                half_tree(&from, &dst.join(&name))?;
            }
            continue;
        }
        match name.strip_suffix(".safetensors") {
            Some(stem) if !stem.ends_with(".fp16") => {
                let t = candle_core::safetensors::load(&from, &Device::Cpu)?;
                let half = t
                    .into_iter()
                    .map(|(k, v)| {
                        let v = if v.dtype().is_float() {
                            v.to_dtype(DType::F16)?
                        } else {
                            v
                        };
                        Ok((k, v))
                    })
                    .collect::<Result<HashMap<_, _>>>()?;
                let to = dst.join(format!("{stem}.fp16.safetensors"));
                candle_core::safetensors::save(&half, to)?;
            }
            _ => {
                std::fs::copy(&from, dst.join(&name)).map_err(|e| Error::io(&from, e))?;
            }
        }
    }
    Ok(())
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(v)
        .map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?;
    crate::fsutil::write_file(path, &bytes)
}
