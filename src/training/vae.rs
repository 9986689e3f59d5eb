//! `ip2p train-vae`: an `AutoencoderKL` of any widths trained on a dataset's pictures (both
//! images of every pair), for worlds small enough that Stable Diffusion's VAE is not the right
//! size. Loss: the mean squared reconstruction error of a sampled latent plus `kl_weight` times
//! the KL divergence from a unit Gaussian (per element). Random crops at native scale with
//! flips; rows at the end of the dataset are held out and reported as reconstruction PSNR.
//! Checkpoints hold the diffusers `vae/` folder and the optimizer state; `--resume` continues
//! from the newest one exactly.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use image::RgbImage;
use rand_core::RngCore;
use serde::{Deserialize, Serialize};

use super::adamw::{AdamW, AdamWConfig};
use super::data::{Columns, PairDataset};
use super::{
    clip_grad_norm, init_default, latest_checkpoint, load_vars, named_vars, open_log, var_builder,
};
use crate::models::{AutoencoderKL, VaeConfig};
use crate::pipeline::image::to_tensor;
use crate::schedulers::noise::rng_for;
use crate::schedulers::{NoiseSource, SeededNoise};
use crate::{Error, Result};

/// Everything a VAE training run needs.
#[derive(Debug, Clone)]
pub struct VaeTrainConfig {
    /// The architecture (a diffusers `AutoencoderKL` config).
    pub vae: VaeConfig,
    pub data: Vec<PathBuf>,
    pub columns: Columns,
    pub out: PathBuf,
    /// Side of the square training crops, at the pictures' own scale.
    pub crop: u32,
    pub batch_size: usize,
    pub steps: u64,
    pub adam: AdamWConfig,
    pub kl_weight: f64,
    /// Clip the global gradient norm (0: off).
    pub max_grad_norm: f64,
    pub seed: u64,
    pub checkpoint_every: u64,
    pub resume: bool,
    /// On resume, accept a checkpoint made with another crop or batch size (a schedule's next
    /// phase: the weights and optimizer moments carry over; the seed must stay).
    pub new_phase: bool,
    /// Rows at the end of the dataset kept out of training, for the PSNR.
    pub holdout: usize,
    pub device: Device,
}

/// One optimisation step, as logged (`train_log.jsonl`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VaeStepLog {
    pub step: u64,
    pub loss: f64,
    pub mse: f64,
    pub kl: f64,
    pub seconds: f64,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct VaeSummary {
    pub start_step: u64,
    pub end_step: u64,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    /// Mean reconstruction PSNR (dB) of the held-out pictures at full size.
    pub psnr_db: f64,
    /// The final `vae/` folder.
    pub final_model: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct VaeState {
    step: u64,
    seed: u64,
    batch_size: usize,
    crop: u32,
}

/// The diffusers `config.json` of `c`.
pub fn diffusers_config(c: &VaeConfig) -> serde_json::Value {
    let n = c.block_out_channels.len();
    serde_json::json!({
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": c.block_out_channels,
        "down_block_types": vec!["DownEncoderBlock2D"; n],
        "up_block_types": vec!["UpDecoderBlock2D"; n],
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "latent_channels": c.latent_channels,
        "layers_per_block": c.layers_per_block,
        "norm_num_groups": c.norm_num_groups,
        "scaling_factor": c.scaling_factor,
        "use_quant_conv": c.use_quant_conv,
        "use_post_quant_conv": c.use_post_quant_conv,
        "mid_block_add_attention": c.mid_block_add_attention,
        "force_upcast": true,
    })
}

/// A square `crop` of one of the pair's pictures at a seeded place, flipped half the time.
fn crop_sample(data: &PairDataset, rows: usize, cfg: &VaeTrainConfig, g: u64) -> Result<RgbImage> {
    let mut rng = rng_for(cfg.seed, b"vaebatch", g);
    let row = (rng.next_u64() % rows.max(1) as u64) as usize;
    let pair = data.get(row)?;
    let img = if rng.next_u32() & 1 == 0 {
        pair.original
    } else {
        pair.edited
    };
    let (w, h) = img.dimensions();
    let c = cfg.crop.min(w).min(h);
    let x = (rng.next_u64() % u64::from(w - c + 1)) as u32;
    let y = (rng.next_u64() % u64::from(h - c + 1)) as u32;
    let mut out = image::imageops::crop_imm(&img, x, y, c, c).to_image();
    if rng.next_u32() & 1 == 1 {
        image::imageops::flip_horizontal_in_place(&mut out);
    }
    Ok(out)
}

/// An open run: the model as variables, its optimizer, the data and where it starts.
struct VaeRun {
    vae: AutoencoderKL,
    vars: Vec<(String, Var)>,
    opt: AdamW,
    data: PairDataset,
    train_rows: usize,
    start_step: u64,
}

impl VaeRun {
    fn open(cfg: &VaeTrainConfig) -> Result<Self> {
        check(cfg)?;
        let dev = &cfg.device;
        let data = PairDataset::open(&cfg.data, cfg.columns.clone())?;
        if data.len() <= cfg.holdout {
            return Err(Error::invalid(
                "holdout",
                format!("{} rows, {} of them held out", data.len(), cfg.holdout),
            ));
        }
        std::fs::create_dir_all(&cfg.out).map_err(|e| Error::io(&cfg.out, e))?;
        let resume = cfg.resume.then(|| latest_checkpoint(&cfg.out)).flatten();
        let map = match &resume {
            Some((_, ck)) => load_vars(&[ck.join("vae/diffusion_pytorch_model.safetensors")], dev)?,
            None => VarMap::new(),
        };
        let vae = AutoencoderKL::new(var_builder(&map, dev), &cfg.vae)
            .map_err(|e| Error::IncompatibleModel(format!("vae: {e}")))?;
        if resume.is_none() {
            init_default(&map, cfg.seed, b"vae_init")?;
        }
        let mut vars: Vec<(String, Var)> = named_vars(&map)?.into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let mut opt = AdamW::new(vars.clone(), cfg.adam);
        if let Some((step, ck)) = &resume {
            let st: VaeState = crate::loader::read_json(&ck.join("training_state/state.json"))?;
            let same = (st.batch_size, st.crop) == (cfg.batch_size, cfg.crop);
            if st.seed != cfg.seed || !(same || cfg.new_phase) {
                return Err(Error::invalid(
                    "resume",
                    format!(
                        "{} was made with other settings; resume with the same",
                        ck.display()
                    ),
                ));
            }
            let moments = candle_core::safetensors::load(
                ck.join("training_state/optimizer.safetensors"),
                dev,
            )?;
            opt.load_state(moments, *step);
            tracing::info!(step, checkpoint = %ck.display(), "resuming");
        }
        Ok(Self {
            vae,
            vars,
            opt,
            train_rows: data.len() - cfg.holdout,
            data,
            start_step: resume.map_or(0, |r| r.0),
        })
    }

    /// One step: a batch of crops, the loss, its gradients (clipped) and the update.
    fn step(&mut self, cfg: &VaeTrainConfig, step: u64) -> Result<VaeStepLog> {
        let t0 = Instant::now();
        let dev = &cfg.device;
        let b = cfg.batch_size as u64;
        let crops = (0..b)
            .map(|j| {
                let img = crop_sample(&self.data, self.train_rows, cfg, (step - 1) * b + j)?;
                to_tensor(&img, dev)
            })
            .collect::<Result<Vec<_>>>()?;
        let x = Tensor::cat(&crops, 0)?;
        let dist = self.vae.encode(&x)?;
        let mut noise = SeededNoise::new(rng_for(cfg.seed, b"vaenoise", step).next_u64());
        let eps = noise.randn(dist.mean.dims(), dev)?;
        let recon = self.vae.decode(&dist.sample_with(&eps)?)?;
        let mse = (recon - &x)?.sqr()?.mean_all()?;
        let var = dist.logvar.exp()?;
        let kl = ((dist.mean.sqr()? + var)? - 1.0)?.sub(&dist.logvar)?;
        let kl = (kl.mean_all()? * 0.5)?;
        let loss = (&mse + (&kl * cfg.kl_weight)?)?;
        let grads = loss.backward()?;
        let mut g: HashMap<String, Tensor> = self
            .vars
            .iter()
            .filter_map(|(n, v)| grads.get(v.as_tensor()).map(|t| (n.clone(), t.detach())))
            .collect();
        clip_grad_norm(&mut g, cfg.max_grad_norm, step)?;
        self.opt.step(&g)?;
        Ok(VaeStepLog {
            step,
            loss: f64::from(loss.to_scalar::<f32>()?),
            mse: f64::from(mse.to_scalar::<f32>()?),
            kl: f64::from(kl.to_scalar::<f32>()?),
            seconds: t0.elapsed().as_secs_f64(),
        })
    }

    /// `checkpoint-<step>`: the `vae/` folder and the optimizer, `state.json` written last.
    fn checkpoint(&self, cfg: &VaeTrainConfig, step: u64) -> Result<PathBuf> {
        let ck = cfg.out.join(format!("checkpoint-{step:08}"));
        save_vae(&cfg.vae, &self.vars, &ck.join("vae"))?;
        let ts = ck.join("training_state");
        std::fs::create_dir_all(&ts).map_err(|e| Error::io(&ts, e))?;
        candle_core::safetensors::save(&self.opt.state(), ts.join("optimizer.safetensors"))?;
        let st = VaeState {
            step,
            seed: cfg.seed,
            batch_size: cfg.batch_size,
            crop: cfg.crop,
        };
        let json = serde_json::to_vec_pretty(&st)
            .map_err(|e| Error::Internal(format!("training state: {e}")))?;
        crate::fsutil::write_file(&ts.join("state.json"), &json)?;
        Ok(ck)
    }
}

fn check(cfg: &VaeTrainConfig) -> Result<()> {
    let down = 1u32 << cfg.vae.block_out_channels.len().saturating_sub(1);
    if cfg.batch_size == 0 || cfg.crop == 0 || !cfg.crop.is_multiple_of(down) {
        return Err(Error::invalid(
            "crop",
            format!("batch size must be positive and the crop a positive multiple of {down}"),
        ));
    }
    if !(cfg.kl_weight.is_finite() && cfg.kl_weight >= 0.0) {
        return Err(Error::invalid("kl_weight", "must be a non-negative number"));
    }
    if !(cfg.adam.lr.is_finite() && cfg.adam.lr > 0.0) {
        return Err(Error::invalid("lr", "must be positive"));
    }
    Ok(())
}

/// Writes a diffusers `vae/` folder (config and f32 weights), replaced whole.
pub fn save_vae(c: &VaeConfig, vars: &[(String, Var)], dst: &Path) -> Result<()> {
    let weights: HashMap<String, Tensor> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
        .collect();
    crate::fsutil::commit_dir(dst, |tmp| {
        let json = serde_json::to_vec_pretty(&diffusers_config(c))
            .map_err(|e| Error::Internal(format!("vae config: {e}")))?;
        crate::fsutil::write_file(&tmp.join("config.json"), &json)?;
        candle_core::safetensors::save(&weights, tmp.join("diffusion_pytorch_model.safetensors"))?;
        Ok(())
    })
}

/// Mean PSNR (dB, 8-bit) of `vae`'s reconstructions (the latent's mean) of rows `rows` of
/// `data`, both pictures of each, at full size.
pub fn psnr(
    vae: &AutoencoderKL,
    data: &PairDataset,
    rows: std::ops::Range<usize>,
    dev: &Device,
) -> Result<f64> {
    let mut total = 0f64;
    let mut n = 0usize;
    for row in rows {
        let pair = data.get(row)?;
        for img in [&pair.original, &pair.edited] {
            let x = to_tensor(img, dev)?;
            let y = vae.decode(&vae.encode(&x)?.mean)?;
            let out =
                crate::pipeline::image::unit_hwc_to_rgb(&crate::pipeline::image::to_unit_hwc(&y)?)?;
            let mse = img
                .as_raw()
                .iter()
                .zip(out.as_raw())
                .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
                .sum::<f64>()
                / img.as_raw().len() as f64;
            total += 10.0 * (255.0f64.powi(2) / mse.max(1e-10)).log10();
            n += 1;
        }
    }
    Ok(total / n.max(1) as f64)
}

/// Runs (or resumes) VAE training. `on_step` sees every step.
pub fn train_vae(cfg: &VaeTrainConfig, on_step: &mut dyn FnMut(&VaeStepLog)) -> Result<VaeSummary> {
    let mut run = VaeRun::open(cfg)?;
    let (mut log, log_path) = open_log(&cfg.out, run.start_step)?;
    let mut summary = VaeSummary {
        start_step: run.start_step,
        end_step: run.start_step,
        ..Default::default()
    };
    for step in run.start_step + 1..=cfg.steps {
        let entry = run.step(cfg, step)?;
        let line = serde_json::to_string(&entry)
            .map_err(|e| Error::Internal(format!("loss log entry: {e}")))?;
        writeln!(log, "{line}").map_err(|e| Error::io(&log_path, e))?;
        summary.first_loss.get_or_insert(entry.loss);
        summary.last_loss = Some(entry.loss);
        summary.end_step = step;
        on_step(&entry);
        if step % cfg.checkpoint_every.max(1) == 0 || step == cfg.steps {
            run.checkpoint(cfg, step)?;
        }
    }
    let final_dir = cfg.out.join("final").join("vae");
    save_vae(&cfg.vae, &run.vars, &final_dir)?;
    let held = run.train_rows..run.data.len();
    summary.psnr_db = psnr(&run.vae, &run.data, held, &cfg.device)?;
    summary.final_model = final_dir;
    Ok(summary)
}
