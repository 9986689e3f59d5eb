//! `ip2p train`: fine-tunes an 8-channel UNet on (input image, instruction, edited image) rows.
//!
//! Per sample: target = a VAE *sample* of the edited image × scaling factor; condition = the VAE
//! *mode* of the input image, unscaled; DDPM `add_noise` at a uniform timestep; ε-prediction MSE.
//! Conditioning dropout as the paper: r ~ U(0, 1); the text becomes the encoding of "" when
//! r < 2p, the image latents become zero when p ≤ r < 3p (p = 0.05: 5 % text only dropped, 5 %
//! both, 5 % image only). The VAE and text encoder stay frozen.
//!
//! Every random draw is a function of the seed and the sample's global position, and a
//! checkpoint stores the weights, the optimizer moments, the EMA and the step, so `--resume`
//! continues exactly where the run stopped.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::adamw::{AdamW, AdamWConfig};
use super::data::{augment, rng_for, unit, Columns, EpochOrder, PairDataset};
use super::ema::Ema;
use super::lora::{self, LoraConfig, LORA_FILE};
use super::{ip2p_loss, load_vars, named_vars, var_builder, NoiseSchedule};
use crate::loader::{self, HubOptions, ModelDir, Variant};
use crate::models::{
    AutoencoderKL, ClipTextModel, ClipTokenizer, UNet2DConditionModel, UNetConfig,
};
use crate::pipeline::image::to_tensor;
use crate::schedulers::SchedulerConfig;
use crate::{Error, Result};

/// Everything a training run needs.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// An InstructPix2Pix folder (8-channel UNet; see `ip2p extend`) or hub id.
    pub model: String,
    pub hub: HubOptions,
    pub data: Vec<PathBuf>,
    pub columns: Columns,
    pub out: PathBuf,
    pub resolution: u32,
    pub batch_size: usize,
    pub grad_accum: usize,
    /// Optimisation steps in total (a resumed run counts the steps already done).
    pub steps: u64,
    pub adam: AdamWConfig,
    /// Clip the global gradient norm to this (0: off).
    pub max_grad_norm: f64,
    /// EMA decay (`None`: no EMA).
    pub ema: Option<f64>,
    pub checkpoint_every: u64,
    pub seed: u64,
    pub center_crop: bool,
    pub random_flip: bool,
    /// p of the conditioning dropout.
    pub conditioning_dropout: f64,
    /// Micro-batches decoded ahead.
    pub prefetch: usize,
    pub resume: bool,
    /// Train LoRA adapters of this shape instead of the whole UNet.
    pub lora: Option<LoraConfig>,
    /// Edit a fixed image every `every` steps with the weights being trained.
    pub samples: Option<SampleEdits>,
    pub device: Device,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: String::new(),
            hub: HubOptions::default(),
            data: Vec::new(),
            columns: Columns::default(),
            out: PathBuf::from("train-out"),
            resolution: 256,
            batch_size: 4,
            grad_accum: 1,
            steps: 1000,
            adam: AdamWConfig::default(),
            max_grad_norm: 1.0,
            ema: Some(0.9999),
            checkpoint_every: 500,
            seed: 42,
            center_crop: false,
            random_flip: true,
            conditioning_dropout: 0.05,
            prefetch: 2,
            resume: false,
            lora: None,
            samples: None,
            device: Device::Cpu,
        }
    }
}

/// Sample edits during training, written to `<out>/samples/step-NNNNNNNN.png`.
#[derive(Debug, Clone)]
pub struct SampleEdits {
    pub every: u64,
    pub image: PathBuf,
    pub instruction: String,
    pub steps: usize,
    pub seed: u64,
}

/// One line of `train_log.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepLog {
    pub step: u64,
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub seconds: f64,
}

/// What a run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TrainSummary {
    pub start_step: u64,
    pub end_step: u64,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub checkpoints: Vec<PathBuf>,
    pub final_model: PathBuf,
}

/// The checkpoint's record of where training stands.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    step: u64,
    seed: u64,
    batch_size: usize,
    grad_accum: usize,
    resolution: u32,
    dataset_rows: usize,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::io(path, e)
}

/// The frozen parts: tokenizer, text encoder, VAE.
#[derive(Clone)]
struct Frozen {
    tokenizer: ClipTokenizer,
    text: ClipTextModel,
    vae: AutoencoderKL,
    empty: Tensor,
}

impl Frozen {
    fn load(dir: &ModelDir, dev: &Device) -> Result<Self> {
        let root = dir.root();
        let tokenizer = ClipTokenizer::from_dir(&root.join("tokenizer"))?;
        let text = loader::load_text_encoder(dir, Variant::Auto, DType::F32, dev)?;
        let vae = loader::load_vae(dir, Variant::Auto, DType::F32, dev)?;
        let mut f = Self {
            tokenizer,
            text,
            vae,
            empty: Tensor::zeros(1, DType::F32, dev)?,
        };
        f.empty = f.encode(&[""], dev)?;
        Ok(f)
    }

    fn encode(&self, prompts: &[&str], dev: &Device) -> Result<Tensor> {
        let mut ids = Vec::new();
        for p in prompts {
            ids.extend(self.tokenizer.encode(p)?.ids);
        }
        let t = ids.len() / prompts.len().max(1);
        let ids = Tensor::from_vec(ids, (prompts.len(), t), dev)?;
        Ok(self.text.forward(&ids)?)
    }
}

/// A decoded micro-batch.
struct Batch {
    original: Tensor,
    edited: Tensor,
    prompts: Vec<String>,
    /// Global sample positions.
    first: u64,
}

fn spawn_loader(
    data: PairDataset,
    cfg: &TrainConfig,
    start_micro: u64,
    end_micro: u64,
) -> Receiver<Result<Batch>> {
    let (tx, rx) = sync_channel(cfg.prefetch.max(1));
    let (b, seed, res, center, flip) = (
        cfg.batch_size,
        cfg.seed,
        cfg.resolution,
        cfg.center_crop,
        cfg.random_flip,
    );
    std::thread::spawn(move || {
        let mut order = EpochOrder::new(seed, data.len());
        for micro in start_micro..end_micro {
            let first = micro * b as u64;
            let rows: Vec<usize> = (0..b as u64).map(|j| order.row(first + j)).collect();
            let items: Vec<Result<(Tensor, Tensor, String)>> = (0..b as u64)
                .into_par_iter()
                .map(|j| {
                    let g = first + j;
                    let pair = data.get(rows[j as usize])?;
                    let mut rng = rng_for(seed, b"augment_", g);
                    let (a, e) = augment(&pair, res, center, flip, &mut rng);
                    Ok((
                        to_tensor(&a, &Device::Cpu)?,
                        to_tensor(&e, &Device::Cpu)?,
                        pair.instruction,
                    ))
                })
                .collect();
            let batch = (|| -> Result<Batch> {
                let mut o = Vec::new();
                let mut e = Vec::new();
                let mut p = Vec::new();
                for it in items {
                    let (a, b, s) = it?;
                    o.push(a);
                    e.push(b);
                    p.push(s);
                }
                Ok(Batch {
                    original: Tensor::cat(&o, 0)?,
                    edited: Tensor::cat(&e, 0)?,
                    prompts: p,
                    first,
                })
            })();
            if tx.send(batch).is_err() {
                break;
            }
        }
    });
    rx
}

/// Writes a complete diffusers pipeline folder at `dst`: the base model's components with the
/// UNet's weights replaced by `unet`. Built under a temporary name and renamed into place.
pub fn save_pipeline(base: &Path, unet: &HashMap<String, Tensor>, dst: &Path) -> Result<()> {
    let parent = dst.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let name = dst
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    super::copy_model_except_unet(base, &tmp, true)?;
    let u = tmp.join("unet");
    std::fs::create_dir_all(&u).map_err(io(&u))?;
    std::fs::copy(base.join("unet/config.json"), u.join("config.json"))
        .map_err(io(&base.join("unet/config.json")))?;
    candle_core::safetensors::save(unet, u.join("diffusion_pytorch_model.safetensors"))?;
    if dst.exists() {
        std::fs::remove_dir_all(dst).map_err(io(dst))?;
    }
    std::fs::rename(&tmp, dst).map_err(io(dst))
}

/// Edits the sample image with `weights` (the whole UNet, or LoRA adapters on the base).
#[allow(clippy::too_many_arguments)]
fn sample_edit(
    dir: &ModelDir,
    ucfg: &UNetConfig,
    scfg: &SchedulerConfig,
    frozen: &Frozen,
    weights: &HashMap<String, Tensor>,
    lora_cfg: Option<LoraConfig>,
    se: &SampleEdits,
    path: &Path,
) -> Result<()> {
    let dev = frozen.empty.device().clone();
    let unet = match lora_cfg {
        None => {
            let vb = candle_nn::VarBuilder::from_tensors(weights.clone(), DType::F32, &dev);
            UNet2DConditionModel::new(vb, ucfg)?
        }
        Some(lc) => {
            let vb = loader::var_builder(
                &dir.weights("unet", "diffusion_pytorch_model", Variant::Auto)?,
                DType::F32,
                &dev,
            )?;
            let mut unet = UNet2DConditionModel::new(vb, ucfg)?;
            let tmp = path.with_extension("lora.tmp");
            if let Some(p) = tmp.parent() {
                std::fs::create_dir_all(p).map_err(io(p))?;
            }
            lora::save(weights, lc, &tmp)?;
            let r = lora::merge_file(&mut unet, &tmp);
            let _ = std::fs::remove_file(&tmp);
            r?;
            unet
        }
    };
    let c = loader::Components {
        tokenizer: frozen.tokenizer.clone(),
        text_encoder: frozen.text.clone(),
        vae: frozen.vae.clone(),
        unet,
        scheduler: scfg.clone(),
        device: dev,
        dtype: DType::F32,
    };
    let pipe = crate::pipeline::EditPipeline::new(c)?;
    let input = crate::pipeline::image::open(&se.image, &Default::default())?;
    let params = crate::pipeline::EditParams {
        instruction: se.instruction.clone(),
        steps: se.steps,
        seed: se.seed,
        resolution: 256,
        ..Default::default()
    };
    let out = pipe.edit(&input, &params, &mut crate::pipeline::NoProgress)?;
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).map_err(io(p))?;
    }
    out.image
        .save(path)
        .map_err(|e| Error::Image(format!("{}: {e}", path.display())))
}

/// A full pipeline folder, or for LoRA a folder with `pytorch_lora_weights.safetensors`
/// (use it with the base model: `ip2p edit --model <base> --lora <file>`).
fn save_model(
    base: &Path,
    weights: &HashMap<String, Tensor>,
    lora_cfg: Option<LoraConfig>,
    dst: &Path,
) -> Result<()> {
    match lora_cfg {
        None => save_pipeline(base, weights, dst),
        Some(lc) => {
            std::fs::create_dir_all(dst).map_err(io(dst))?;
            let tmp = dst.join(format!(".{LORA_FILE}.tmp"));
            lora::save(weights, lc, &tmp)?;
            std::fs::rename(&tmp, dst.join(LORA_FILE)).map_err(io(dst))
        }
    }
}

fn snapshot(vars: &[(String, Var)]) -> Result<HashMap<String, Tensor>> {
    vars.iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().detach().copy()?)))
        .collect()
}

/// The newest complete checkpoint under `out`.
fn latest_checkpoint(out: &Path) -> Option<(u64, PathBuf)> {
    let rd = std::fs::read_dir(out).ok()?;
    rd.filter_map(|e| e.ok())
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

fn validate(cfg: &TrainConfig) -> Result<()> {
    let bad = |f: &'static str, m: &str| Err(Error::invalid(f, m));
    if cfg.batch_size == 0 || cfg.grad_accum == 0 {
        return bad("batch_size", "batch size and accumulation must be positive");
    }
    if cfg.resolution == 0 || !cfg.resolution.is_multiple_of(8) {
        return bad("resolution", "must be a positive multiple of 8");
    }
    let a = &cfg.adam;
    if !(a.lr.is_finite() && a.lr > 0.0 && a.weight_decay.is_finite() && a.weight_decay >= 0.0) {
        return bad(
            "lr",
            "learning rate must be positive and weight decay non-negative",
        );
    }
    if !((0.0..1.0).contains(&a.beta1) && (0.0..1.0).contains(&a.beta2) && a.eps > 0.0) {
        return bad("adam", "betas must lie in [0, 1) and eps be positive");
    }
    if !(cfg.max_grad_norm.is_finite() && cfg.max_grad_norm >= 0.0) {
        return bad("max_grad_norm", "must be a non-negative number");
    }
    if let Some(d) = cfg.ema {
        if !(0.0..1.0).contains(&d) {
            return bad("ema", "decay must lie in [0, 1)");
        }
    }
    if !(0.0..=1.0 / 3.0).contains(&cfg.conditioning_dropout) {
        return bad("conditioning_dropout", "must lie in [0, 1/3]");
    }
    Ok(())
}

/// Runs (or resumes) training. `on_step` sees every optimisation step.
pub fn train(cfg: &TrainConfig, on_step: &mut dyn FnMut(&StepLog)) -> Result<TrainSummary> {
    validate(cfg)?;
    let dev = &cfg.device;
    let dir = ModelDir::open(&cfg.model, &cfg.hub)?;
    let base = dir.root().to_path_buf();
    let ucfg: UNetConfig = dir.config("unet", "config.json")?;
    if ucfg.in_channels != 8 {
        return Err(Error::IncompatibleModel(format!(
            "the UNet has {} input channels; training needs InstructPix2Pix's 8 (run `ip2p extend` first)",
            ucfg.in_channels
        )));
    }
    let scfg: SchedulerConfig = dir.config("scheduler", "scheduler_config.json")?;
    let schedule = NoiseSchedule::new(&scfg)?;
    let frozen = Frozen::load(&dir, dev)?;
    let data = PairDataset::open(&cfg.data, cfg.columns.clone())?;
    std::fs::create_dir_all(&cfg.out).map_err(io(&cfg.out))?;

    // Where to start: the base weights, or the newest checkpoint.
    let resume = if cfg.resume {
        latest_checkpoint(&cfg.out)
    } else {
        None
    };
    let start_step = resume.as_ref().map(|r| r.0).unwrap_or(0);
    let (unet, vars) = match cfg.lora {
        // LoRA: the base weights stay plain (frozen) tensors; only the adapters are variables.
        Some(lc) => {
            if lc.rank == 0 || !(lc.alpha.is_finite() && lc.alpha > 0.0) {
                return Err(Error::invalid("lora", "rank and alpha must be positive"));
            }
            let vb = loader::var_builder(
                &dir.weights("unet", "diffusion_pytorch_model", Variant::Auto)?,
                DType::F32,
                dev,
            )?;
            let mut unet =
                crate::models::nn::build_differentiable(|| UNet2DConditionModel::new(vb, &ucfg))
                    .map_err(|e| Error::IncompatibleModel(format!("unet: {e}")))?;
            let existing = match &resume {
                Some((_, ck)) => Some(candle_core::safetensors::load(
                    ck.join("training_state/lora.safetensors"),
                    dev,
                )?),
                None => None,
            };
            let vars = lora::attach(&mut unet, lc, cfg.seed, dev, existing.as_ref())?;
            (unet, vars)
        }
        None => {
            let vars_map: VarMap = match &resume {
                Some((_, ck)) => load_vars(&[ck.join("training_state/unet.safetensors")], dev)?,
                None => load_vars(
                    &dir.weights("unet", "diffusion_pytorch_model", Variant::Auto)?,
                    dev,
                )?,
            };
            let unet = UNet2DConditionModel::new(var_builder(&vars_map, dev), &ucfg)
                .map_err(|e| Error::IncompatibleModel(format!("unet: {e}")))?;
            let mut vars: Vec<(String, Var)> = named_vars(&vars_map)?.into_iter().collect();
            vars.sort_by(|a, b| a.0.cmp(&b.0));
            (unet, vars)
        }
    };
    let mut opt = AdamW::new(vars.clone(), cfg.adam);
    let mut ema = match cfg.ema {
        Some(d) => Some(Ema::new(&vars, d)?),
        None => None,
    };
    if let Some((step, ck)) = &resume {
        let st: State = loader::read_json(&ck.join("training_state/state.json"))?;
        if (st.seed, st.batch_size, st.grad_accum, st.resolution)
            != (cfg.seed, cfg.batch_size, cfg.grad_accum, cfg.resolution)
        {
            return Err(Error::invalid(
                "resume",
                format!(
                    "{} was made with seed {}, batch {}, accumulation {}, resolution {}; resume with the same",
                    ck.display(),
                    st.seed,
                    st.batch_size,
                    st.grad_accum,
                    st.resolution
                ),
            ));
        }
        let o =
            candle_core::safetensors::load(ck.join("training_state/optimizer.safetensors"), dev)?;
        opt.load_state(o, *step);
        if let Some(e) = &mut ema {
            let p = ck.join("training_state/ema.safetensors");
            if p.is_file() {
                e.shadow = candle_core::safetensors::load(&p, dev)?;
            }
        }
        tracing::info!(step, checkpoint = %ck.display(), "resuming");
    }

    // The loss log keeps the lines up to where this run starts.
    let log_path = cfg.out.join("train_log.jsonl");
    let mut kept = String::new();
    if let Ok(old) = std::fs::read_to_string(&log_path) {
        for line in old.lines() {
            if let Ok(l) = serde_json::from_str::<StepLog>(line) {
                if l.step <= start_step {
                    kept.push_str(line);
                    kept.push('\n');
                }
            }
        }
    }
    std::fs::write(&log_path, kept).map_err(io(&log_path))?;
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(&log_path)
        .map_err(io(&log_path))?;

    let micro_per_step = cfg.grad_accum as u64;
    let rx = spawn_loader(
        data.clone(),
        cfg,
        start_step * micro_per_step,
        cfg.steps * micro_per_step,
    );
    let mut summary = TrainSummary {
        start_step,
        end_step: start_step,
        ..Default::default()
    };
    let p = cfg.conditioning_dropout;
    let sf = frozen.vae.config().scaling_factor;
    let n_t = schedule.num_train_timesteps() as u64;
    for step in start_step + 1..=cfg.steps {
        let t0 = Instant::now();
        let mut acc: HashMap<String, Tensor> = HashMap::new();
        let mut loss_sum = 0f64;
        for _ in 0..micro_per_step {
            let batch = rx
                .recv()
                .map_err(|_| Error::invalid("data", "the data loader stopped"))??;
            let b = batch.prompts.len();
            // Per-sample draws, from each sample's global position.
            let mut ts = Vec::with_capacity(b);
            let mut noise = Vec::with_capacity(b);
            let mut eps = Vec::with_capacity(b);
            let mut texts = Vec::with_capacity(b);
            let mut keep_image = Vec::with_capacity(b);
            for j in 0..b {
                let g = batch.first + j as u64;
                let mut rng = rng_for(cfg.seed, b"sample__", g);
                let r = unit(&mut rng);
                ts.push((rand_core::RngCore::next_u64(&mut rng) % n_t) as u32);
                let mut ns =
                    crate::schedulers::SeededNoise::new(rand_core::RngCore::next_u64(&mut rng));
                let h = (cfg.resolution / 8) as usize;
                noise.push(crate::schedulers::NoiseSource::randn(
                    &mut ns,
                    &[1, 4, h, h],
                    dev,
                )?);
                eps.push(crate::schedulers::NoiseSource::randn(
                    &mut ns,
                    &[1, 4, h, h],
                    dev,
                )?);
                texts.push(r < 2.0 * p);
                keep_image.push(!(r >= p && r < 3.0 * p));
            }
            let noise = Tensor::cat(&noise, 0)?;
            let eps = Tensor::cat(&eps, 0)?;
            let original = batch.original.to_device(dev)?;
            let edited = batch.edited.to_device(dev)?;
            let target = (frozen.vae.encode(&edited)?.sample_with(&eps)? * sf)?;
            let image_lat = frozen.vae.encode(&original)?.mean;
            let mask: Vec<f32> = keep_image
                .iter()
                .map(|&k| if k { 1.0 } else { 0.0 })
                .collect();
            let mask = Tensor::from_vec(mask, (b, 1, 1, 1), dev)?;
            let image_lat = image_lat.broadcast_mul(&mask)?;
            let prompts: Vec<&str> = batch.prompts.iter().map(String::as_str).collect();
            let mut text = frozen.encode(&prompts, dev)?;
            if texts.iter().any(|&d| d) {
                let rows = (0..b)
                    .map(|j| {
                        if texts[j] {
                            Ok(frozen.empty.clone())
                        } else {
                            text.narrow(0, j, 1)
                        }
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                text = Tensor::cat(&rows, 0)?;
            }
            let noisy = schedule.add_noise(&target, &noise, &ts)?;
            let loss = ip2p_loss(&unet, &noisy, &image_lat, &ts, &text, &noise)?;
            loss_sum += f64::from(loss.to_scalar::<f32>()?);
            let grads = loss.backward()?;
            for (name, var) in &vars {
                if let Some(g) = grads.get(var.as_tensor()) {
                    let g = g.detach();
                    let next = match acc.remove(name) {
                        Some(a) => (a + g)?,
                        None => g,
                    };
                    acc.insert(name.clone(), next);
                }
            }
        }
        // Average over micro-batches, clip the global norm, update.
        let scale = 1.0 / micro_per_step as f64;
        let mut sq = 0f64;
        for g in acc.values_mut() {
            if micro_per_step > 1 {
                *g = (&*g * scale)?;
            }
            sq += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
        }
        let norm = sq.sqrt();
        if !norm.is_finite() {
            return Err(Error::invalid(
                "training",
                format!("the gradient norm is {norm} at step {step}; lower the learning rate"),
            ));
        }
        if cfg.max_grad_norm > 0.0 {
            let coef = cfg.max_grad_norm / (norm + 1e-6);
            if coef < 1.0 {
                for g in acc.values_mut() {
                    *g = (&*g * coef)?;
                }
            }
        }
        opt.step(&acc)?;
        if let Some(e) = &mut ema {
            e.update(&vars, step)?;
        }
        let entry = StepLog {
            step,
            loss: loss_sum / micro_per_step as f64,
            grad_norm: norm,
            lr: cfg.adam.lr,
            seconds: t0.elapsed().as_secs_f64(),
        };
        let line = serde_json::to_string(&entry)
            .map_err(|e| Error::Internal(format!("loss log entry: {e}")))?;
        writeln!(log, "{line}").map_err(io(&log_path))?;
        summary.first_loss.get_or_insert(entry.loss);
        summary.last_loss = Some(entry.loss);
        summary.end_step = step;
        on_step(&entry);

        if let Some(se) = &cfg.samples {
            if se.every > 0 && (step % se.every == 0 || step == cfg.steps) {
                let weights = match &ema {
                    Some(e) => e.shadow.clone(),
                    None => snapshot(&vars)?,
                };
                let path = cfg.out.join("samples").join(format!("step-{step:08}.png"));
                sample_edit(&dir, &ucfg, &scfg, &frozen, &weights, cfg.lora, se, &path)?;
            }
        }
        if step % cfg.checkpoint_every.max(1) == 0 || step == cfg.steps {
            let ck = cfg.out.join(format!("checkpoint-{step:08}"));
            let raw = snapshot(&vars)?;
            let serve = match &ema {
                Some(e) => e.shadow.clone(),
                None => raw.clone(),
            };
            save_model(&base, &serve, cfg.lora, &ck)?;
            let ts = ck.join("training_state");
            std::fs::create_dir_all(&ts).map_err(io(&ts))?;
            let raw_name = if cfg.lora.is_some() {
                "lora.safetensors"
            } else {
                "unet.safetensors"
            };
            candle_core::safetensors::save(&raw, ts.join(raw_name))?;
            candle_core::safetensors::save(&opt.state(), ts.join("optimizer.safetensors"))?;
            if let Some(e) = &ema {
                candle_core::safetensors::save(&e.shadow, ts.join("ema.safetensors"))?;
            }
            let st = State {
                step,
                seed: cfg.seed,
                batch_size: cfg.batch_size,
                grad_accum: cfg.grad_accum,
                resolution: cfg.resolution,
                dataset_rows: data.len(),
            };
            // Written last: a checkpoint without it is incomplete and ignored by --resume.
            let sj = serde_json::to_vec_pretty(&st)
                .map_err(|e| Error::Internal(format!("training state: {e}")))?;
            let tmp = ts.join(".state.json.tmp");
            std::fs::write(&tmp, sj).map_err(io(&tmp))?;
            std::fs::rename(&tmp, ts.join("state.json")).map_err(io(&ts))?;
            summary.checkpoints.push(ck);
        }
    }
    let final_dir = cfg.out.join("final");
    if summary.end_step > start_step || !final_dir.exists() {
        let serve = match &ema {
            Some(e) => e.shadow.clone(),
            None => snapshot(&vars)?,
        };
        save_model(&base, &serve, cfg.lora, &final_dir)?;
    }
    summary.final_model = final_dir;
    Ok(summary)
}
