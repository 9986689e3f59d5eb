//! Training: extend a Stable Diffusion UNet to InstructPix2Pix's 8 input channels, and fine-tune
//! it on (input image, instruction, edited image) triples.
//!
//! Training builds the networks from [`candle_core::Var`]s, which steers every layer onto its
//! differentiable form (candle's convolution rather than the inference kernel, composed
//! softmax/normalisations rather than the fused ones), so gradients reach every parameter while
//! inference keeps its fast paths.

pub mod adamw;
pub mod assemble;
pub mod data;
pub mod ema;
pub mod embedding;
pub mod encodings;
pub mod extend;
pub mod lora;
pub mod merge;
pub mod trainer;
pub mod vae;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use crate::schedulers::noise::{rng_for, unit};
use crate::schedulers::{alphas_cumprod, SchedulerConfig};
use crate::{Error, Result};

/// Copies a model folder into `dst` except its `unet/`, hard-linking files where the file system
/// allows (`link`) and copying otherwise.
pub(crate) fn copy_model_except_unet(
    src: &std::path::Path,
    dst: &std::path::Path,
    link: bool,
) -> Result<()> {
    copy_tree(src, dst, link, &["unet"])
}

pub(crate) use crate::fsutil::copy_tree;

/// `<out>/train_log.jsonl` (one JSON object per step, with its `step`), keeping the lines up to
/// `start_step` of an earlier run and dropping the rest (steps a resumed run redoes), open for
/// appending.
pub(crate) fn open_log(out: &std::path::Path, start_step: u64) -> Result<(std::fs::File, PathBuf)> {
    let path = out.join("train_log.jsonl");
    let mut kept = String::new();
    if let Ok(old) = std::fs::read_to_string(&path) {
        for line in old.lines() {
            let step = serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v["step"].as_u64());
            if step.is_some_and(|s| s <= start_step) {
                kept.push_str(line);
                kept.push('\n');
            }
        }
    }
    std::fs::write(&path, kept).map_err(|e| Error::io(&path, e))?;
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    Ok((log, path))
}

/// Fresh weights: PyTorch's default bound `1/√fan_in` (uniform) for convolution and linear
/// weights, norms' scales 1, every bias 0; drawn in name order from `seed` and `stream`.
pub(crate) fn init_default(map: &VarMap, seed: u64, stream: &[u8; 8]) -> Result<()> {
    let vars = named_vars(map)?;
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for (k, name) in names.into_iter().enumerate() {
        let var = &vars[name];
        let dims = var.dims().to_vec();
        let t = if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
            let mut rng = rng_for(seed, stream, k as u64);
            let n: usize = dims.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|_| ((2.0 * unit(&mut rng) - 1.0) * bound) as f32)
                .collect();
            Tensor::from_vec(v, dims.as_slice(), var.device())?
        } else if name.ends_with(".weight") {
            Tensor::ones(dims.as_slice(), DType::F32, var.device())?
        } else {
            Tensor::zeros(dims.as_slice(), DType::F32, var.device())?
        };
        var.set(&t)?;
    }
    Ok(())
}

/// Loads safetensors files as trainable variables (f32), keyed by their names.
pub fn load_vars(files: &[PathBuf], device: &Device) -> Result<VarMap> {
    let map = VarMap::new();
    {
        let mut data = map.data().lock().map_err(|_| Error::Config {
            path: PathBuf::new(),
            message: "variable map poisoned".into(),
        })?;
        for f in files {
            let tensors = candle_core::safetensors::load(f, device)
                .map_err(|e| Error::IncompatibleModel(format!("{}: {e}", f.display())))?;
            for (name, t) in tensors {
                let t = if t.dtype() == DType::F32 {
                    t
                } else {
                    t.to_dtype(DType::F32)?
                };
                data.insert(name, Var::from_tensor(&t)?);
            }
        }
    }
    Ok(map)
}

/// A `VarBuilder` over trainable variables.
pub fn var_builder(map: &VarMap, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_varmap(map, DType::F32, device)
}

/// The variables of a map by name.
pub fn named_vars(map: &VarMap) -> Result<HashMap<String, Var>> {
    let data = map.data().lock().map_err(|_| Error::Config {
        path: PathBuf::new(),
        message: "variable map poisoned".into(),
    })?;
    Ok(data.clone())
}

/// DDPM's forward process: `x_t = √ᾱ_t · x₀ + √(1 − ᾱ_t) · ε`, in float32 as diffusers'
/// `DDPMScheduler.add_noise` computes it.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    alphas_cumprod: Vec<f32>,
}

impl NoiseSchedule {
    /// From the model's `scheduler_config.json` (its betas; DDPM's defaults where absent).
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        Ok(Self {
            alphas_cumprod: alphas_cumprod(config, "linear", 0.0001, 0.02)?,
        })
    }

    /// Min-SNR-γ loss weights for ε-prediction (Hang et al. 2023; diffusers' `--snr_gamma`):
    /// `min(SNR(t), γ) / SNR(t)` per sample, `SNR = ᾱ / (1 − ᾱ)`. They lower the weight of the
    /// low-noise steps, so the high-noise ones, where a picture's colours and layout are set,
    /// carry more of the loss. `[B]`.
    pub fn min_snr_weights(&self, timesteps: &[u32], gamma: f64, dev: &Device) -> Result<Tensor> {
        let mut w = Vec::with_capacity(timesteps.len());
        for &t in timesteps {
            let ac = f64::from(*self.alphas_cumprod.get(t as usize).ok_or_else(|| {
                Error::invalid("timesteps", format!("timestep {t} is out of range"))
            })?);
            let snr = ac / (1.0 - ac);
            w.push((snr.min(gamma) / snr) as f32);
        }
        Ok(Tensor::new(w.as_slice(), dev)?)
    }

    /// ᾱ at training timestep `t`, if it is in range.
    pub fn alpha_cumprod(&self, t: u32) -> Option<f32> {
        self.alphas_cumprod.get(t as usize).copied()
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// Noises `x0: [B, ...]` with `noise` at one timestep per sample.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &[u32]) -> Result<Tensor> {
        let b = x0.dim(0)?;
        if timesteps.len() != b {
            return Err(Error::invalid(
                "timesteps",
                format!("{} timesteps for a batch of {b}", timesteps.len()),
            ));
        }
        let mut a = Vec::with_capacity(b);
        let mut s = Vec::with_capacity(b);
        for &t in timesteps {
            let ac = *self.alphas_cumprod.get(t as usize).ok_or_else(|| {
                Error::invalid("timesteps", format!("timestep {t} is out of range"))
            })?;
            a.push(ac.sqrt());
            s.push((1.0f32 - ac).sqrt());
        }
        let mut shape = vec![b];
        shape.extend(std::iter::repeat_n(1, x0.rank() - 1));
        let a = Tensor::from_vec(a, shape.as_slice(), x0.device())?.to_dtype(x0.dtype())?;
        let s = Tensor::from_vec(s, shape.as_slice(), x0.device())?.to_dtype(x0.dtype())?;
        Ok((x0.broadcast_mul(&a)? + noise.broadcast_mul(&s)?)?)
    }
}

/// The InstructPix2Pix objective: mean squared error between the UNet's ε-prediction on
/// `[noisy, image_latents]` and the noise.
pub fn ip2p_loss(
    unet: &crate::models::UNet2DConditionModel,
    noisy: &Tensor,
    image_latents: &Tensor,
    timesteps: &[u32],
    text: &Tensor,
    noise: &Tensor,
) -> Result<Tensor> {
    ip2p_loss_weighted(unet, noisy, image_latents, timesteps, text, noise, None)
}

/// [`ip2p_loss`] with an optional weight per sample (`[B]`, e.g.
/// [`NoiseSchedule::min_snr_weights`]): the mean over samples of `w · MSE`. `None` is the
/// plain mean, computed exactly as [`ip2p_loss`].
pub fn ip2p_loss_weighted(
    unet: &crate::models::UNet2DConditionModel,
    noisy: &Tensor,
    image_latents: &Tensor,
    timesteps: &[u32],
    text: &Tensor,
    noise: &Tensor,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    let x = Tensor::cat(&[noisy, image_latents], 1)?;
    let pred = predict_eps(unet, &x, timesteps, text)?;
    weighted_mse(&pred, noise, weights)
}

/// The ε-objective of every diffusion trainer: mean squared error between the UNet's
/// prediction on `x` (its whole input) at `timesteps` and the noise.
pub fn eps_loss(
    unet: &crate::models::UNet2DConditionModel,
    x: &Tensor,
    timesteps: &[u32],
    text: &Tensor,
    noise: &Tensor,
) -> Result<Tensor> {
    weighted_mse(&predict_eps(unet, x, timesteps, text)?, noise, None)
}

/// The UNet's ε-prediction on `x` at one integer timestep per sample.
fn predict_eps(
    unet: &crate::models::UNet2DConditionModel,
    x: &Tensor,
    timesteps: &[u32],
    text: &Tensor,
) -> Result<Tensor> {
    let t: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
    let t = Tensor::new(t.as_slice(), x.device())?;
    Ok(unet.forward(x, &t, text)?)
}

/// Mean squared error of `pred` against `target`: over every element, or, with `[B]` weights,
/// the mean over samples of `w · (each sample's MSE)`.
fn weighted_mse(pred: &Tensor, target: &Tensor, weights: Option<&Tensor>) -> Result<Tensor> {
    let sq = (pred - target)?.sqr()?;
    match weights {
        None => Ok(sq.mean_all()?),
        Some(w) => Ok((sq.flatten_from(1)?.mean(1)? * w)?.mean_all()?),
    }
}

/// Scales the gradients so their global norm is at most `max` (0: off) and returns the norm
/// before; a non-finite norm is an error naming the step.
pub(crate) fn clip_grad_norm(g: &mut HashMap<String, Tensor>, max: f64, step: u64) -> Result<f64> {
    let mut sq = 0f64;
    for t in g.values() {
        sq += f64::from(t.sqr()?.sum_all()?.to_scalar::<f32>()?);
    }
    let norm = sq.sqrt();
    if !norm.is_finite() {
        return Err(Error::invalid(
            "training",
            format!("the gradient norm is {norm} at step {step}; lower the learning rate"),
        ));
    }
    let coef = max / (norm + 1e-6);
    if max > 0.0 && coef < 1.0 {
        for t in g.values_mut() {
            *t = (&*t * coef)?;
        }
    }
    Ok(norm)
}

/// The newest complete checkpoint (`checkpoint-<step>` with its `training_state/state.json`)
/// under `out`.
pub(crate) fn latest_checkpoint(out: &std::path::Path) -> Option<(u64, PathBuf)> {
    std::fs::read_dir(out)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let step: u64 = n.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path()
                .join("training_state/state.json")
                .is_file()
                .then(|| (step, e.path()))
        })
        .max_by_key(|(s, _)| *s)
}
