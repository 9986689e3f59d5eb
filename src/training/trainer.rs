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
use super::encodings::{CacheStore, CachedBatch, EncodingCache};
use super::lora::{self, LoraConfig, LORA_FILE};
use super::{
    clip_grad_norm, ip2p_loss_weighted, latest_checkpoint, load_vars, named_vars, open_log,
    var_builder, NoiseSchedule,
};
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
    /// Encode every row's pictures (whole, at their own size) and every instruction once, and
    /// train on those encodings (see [`super::encodings`]); `resolution` and `center_crop` are
    /// then unused.
    pub cache_encodings: bool,
    /// Where cached encodings are kept between runs (`None`: `<out>/encodings`); see
    /// [`super::encodings::CacheStore`].
    pub encodings_dir: Option<PathBuf>,
    pub resume: bool,
    /// Train LoRA adapters of this shape instead of the whole UNet.
    pub lora: Option<LoraConfig>,
    /// Edit a fixed image every `every` steps with the weights being trained.
    pub samples: Option<SampleEdits>,
    /// LoRA files folded into the starting model (UNet and text encoder), as `--lora` folds
    /// them at load: the run trains from `<out>/base`, the model with them baked in.
    pub loras: Vec<loader::lora::LoraSpec>,
    /// Textual Inversion embeddings bound to the frozen text encoder: their trigger words may
    /// appear in the instructions (edit with the same `--embedding` afterwards).
    pub embeddings: Vec<loader::embeddings::EmbeddingSpec>,
    /// An A1111 hypernetwork applied (frozen) to the UNet's attention while it trains: the
    /// UNet learns with it in place (edit with the same `--hypernetwork` afterwards).
    pub hypernetwork: Option<loader::hypernetwork::HypernetworkSpec>,
    /// Min-SNR-γ loss weighting (`None`: the plain ε-MSE, as the InstructPix2Pix script).
    pub snr_gamma: Option<f64>,
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
            cache_encodings: false,
            encodings_dir: None,
            resume: false,
            lora: None,
            samples: None,
            loras: Vec::new(),
            embeddings: Vec::new(),
            hypernetwork: None,
            snr_gamma: None,
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
    #[serde(default)]
    cache_encodings: bool,
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
    fn load(
        dir: &ModelDir,
        embeddings: &[loader::embeddings::EmbeddingSpec],
        dev: &Device,
    ) -> Result<Self> {
        let root = dir.root();
        let mut tokenizer = ClipTokenizer::from_dir(&root.join("tokenizer"))?;
        let mut text = loader::load_text_encoder(dir, Variant::Auto, DType::F32, dev)?;
        for spec in embeddings {
            let emb = loader::embeddings::read(spec)?;
            loader::add_embedding(&mut tokenizer, &mut text, &emb)?;
        }
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

/// A micro-batch: decoded pictures, or rows of the encoding cache.
enum Micro {
    Pixels(Batch),
    Cached {
        /// Global position of the first sample.
        first: u64,
        batch: CachedBatch,
    },
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
    crate::fsutil::commit_dir(dst, |tmp| {
        super::copy_model_except_unet(base, tmp, true)?;
        let u = tmp.join("unet");
        std::fs::create_dir_all(&u).map_err(io(&u))?;
        let config = base.join("unet/config.json");
        std::fs::copy(&config, u.join("config.json")).map_err(io(&config))?;
        candle_core::safetensors::save(unet, u.join("diffusion_pytorch_model.safetensors"))?;
        Ok(())
    })
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
            lora::save(weights, lc, &dst.join(LORA_FILE))
        }
    }
}

/// The model a run trains from: `cfg.model` itself, or with `cfg.loras` folded in, made once in
/// `<out>/base` (its `ip2p_loras.json` names the files; a resumed run with other files is
/// refused rather than mixed).
fn base_model(cfg: &TrainConfig, dir: ModelDir) -> Result<ModelDir> {
    if cfg.loras.is_empty() {
        return Ok(dir);
    }
    let base = cfg.out.join("base");
    let record_path = base.join("ip2p_loras.json");
    let record = serde_json::to_string(
        &cfg.loras
            .iter()
            .map(|l| serde_json::json!({"file": l.path, "scale": l.scale}))
            .collect::<Vec<_>>(),
    )
    .map_err(|e| Error::invalid("lora", e.to_string()))?;
    match std::fs::read_to_string(&record_path) {
        Ok(had) if had == record => {}
        Ok(had) => {
            return Err(Error::invalid(
                "lora",
                format!(
                    "{} was made with other LoRA files ({had}); use another --out",
                    base.display()
                ),
            ))
        }
        Err(_) => {
            tracing::info!(base = %base.display(), "folding the LoRA files into the starting model");
            loader::bake_loras(&dir, &cfg.loras, &base)?;
            std::fs::write(&record_path, &record).map_err(io(&record_path))?;
        }
    }
    ModelDir::from_dir(&base)
}

/// What the embeddings add to the encodings' key: each file's path, bytes and trigger word.
fn embedding_salt(specs: &[loader::embeddings::EmbeddingSpec]) -> Vec<(String, PathBuf)> {
    specs
        .iter()
        .map(|s| (s.token.clone().unwrap_or_default(), s.path.clone()))
        .collect()
}

fn snapshot(vars: &[(String, Var)]) -> Result<HashMap<String, Tensor>> {
    vars.iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().detach().copy()?)))
        .collect()
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
    if cfg.snr_gamma.is_some_and(|g| !(g.is_finite() && g > 0.0)) {
        return bad("snr_gamma", "must be a positive number");
    }
    if !(0.0..=1.0 / 3.0).contains(&cfg.conditioning_dropout) {
        return bad("conditioning_dropout", "must lie in [0, 1/3]");
    }
    Ok(())
}

/// Everything an open run holds: the model, its trainable variables, the optimizer and EMA,
/// and where it starts.
struct Run {
    dir: ModelDir,
    ucfg: UNetConfig,
    scfg: SchedulerConfig,
    schedule: NoiseSchedule,
    frozen: Frozen,
    data: PairDataset,
    cache: Option<EncodingCache>,
    unet: UNet2DConditionModel,
    vars: Vec<(String, Var)>,
    opt: AdamW,
    ema: Option<Ema>,
    start_step: u64,
}

impl Run {
    /// Opens the model and data, builds the trainable UNet (whole, or LoRA adapters on frozen
    /// weights) and its optimizer, and restores the newest checkpoint when resuming.
    fn open(cfg: &TrainConfig) -> Result<Self> {
        validate(cfg)?;
        let dev = &cfg.device;
        std::fs::create_dir_all(&cfg.out).map_err(io(&cfg.out))?;
        let dir = base_model(cfg, ModelDir::open(&cfg.model, &cfg.hub)?)?;
        let ucfg: UNetConfig = dir.config("unet", "config.json")?;
        if ucfg.in_channels != 8 {
            return Err(Error::IncompatibleModel(format!(
                "the UNet has {} input channels; training needs InstructPix2Pix's 8 (run `ip2p extend` first)",
                ucfg.in_channels
            )));
        }
        let scfg: SchedulerConfig = dir.config("scheduler", "scheduler_config.json")?;
        let schedule = NoiseSchedule::new(&scfg)?;
        let frozen = Frozen::load(&dir, &cfg.embeddings, dev)?;
        let data = PairDataset::open(&cfg.data, cfg.columns.clone())?;
        std::fs::create_dir_all(&cfg.out).map_err(io(&cfg.out))?;
        let resume = if cfg.resume {
            latest_checkpoint(&cfg.out)
        } else {
            None
        };
        let checkpoint = resume.as_ref().map(|r| r.1.as_path());
        let (mut unet, vars) = trainable_unet(cfg, &dir, &ucfg, checkpoint)?;
        if let Some(spec) = &cfg.hypernetwork {
            unet.set_hypernetwork(Some(loader::hypernetwork::read(spec)?.to_device(dev)?));
        }
        let cache = if cfg.cache_encodings {
            let at = cfg
                .encodings_dir
                .clone()
                .unwrap_or_else(|| cfg.out.join("encodings"));
            let store = CacheStore::new(&at, &cfg.data, &cfg.columns, dir.root())?
                .salted(&embedding_salt(&cfg.embeddings))?;
            let encode = |p: &[&str]| frozen.encode(p, dev);
            Some(EncodingCache::load_or_build(
                &store,
                &data,
                &frozen.vae,
                &encode,
                dev,
            )?)
        } else {
            None
        };
        let mut run = Self {
            opt: AdamW::new(vars.clone(), cfg.adam),
            ema: cfg.ema.map(|d| Ema::new(&vars, d)).transpose()?,
            start_step: resume.as_ref().map_or(0, |r| r.0),
            dir,
            ucfg,
            scfg,
            schedule,
            frozen,
            data,
            cache,
            unet,
            vars,
        };
        if let Some((step, ck)) = &resume {
            run.restore(cfg, *step, ck)?;
        }
        Ok(run)
    }

    /// Loads the optimizer moments and EMA of checkpoint `ck` (made with the same settings).
    fn restore(&mut self, cfg: &TrainConfig, step: u64, ck: &Path) -> Result<()> {
        let st: State = loader::read_json(&ck.join("training_state/state.json"))?;
        if (st.seed, st.batch_size, st.grad_accum, st.resolution)
            != (cfg.seed, cfg.batch_size, cfg.grad_accum, cfg.resolution)
            || st.cache_encodings != cfg.cache_encodings
        {
            return Err(Error::invalid(
                "resume",
                format!(
                    "{} was made with seed {}, batch {}, accumulation {}, resolution {}, cached encodings {}; resume with the same",
                    ck.display(),
                    st.seed,
                    st.batch_size,
                    st.grad_accum,
                    st.resolution,
                    st.cache_encodings
                ),
            ));
        }
        let dev = &cfg.device;
        let moments =
            candle_core::safetensors::load(ck.join("training_state/optimizer.safetensors"), dev)?;
        self.opt.load_state(moments, step);
        if let Some(e) = &mut self.ema {
            let p = ck.join("training_state/ema.safetensors");
            if p.is_file() {
                e.shadow = candle_core::safetensors::load(&p, dev)?;
            }
        }
        tracing::info!(step, checkpoint = %ck.display(), "resuming");
        Ok(())
    }

    /// The weights a sample edit or a saved model uses: the EMA's, else the live ones.
    fn serving_weights(&self) -> Result<HashMap<String, Tensor>> {
        match &self.ema {
            Some(e) => Ok(e.shadow.clone()),
            None => snapshot(&self.vars),
        }
    }

    /// One micro-batch: draws, encodings, the loss and its gradients, added into `acc`.
    /// Returns the loss.
    fn micro_step(
        &self,
        cfg: &TrainConfig,
        micro: Micro,
        acc: &mut HashMap<String, Tensor>,
    ) -> Result<f64> {
        let dev = &cfg.device;
        let (target, image_lat, prompts, d) = self.encodings(cfg, micro)?;
        let image_lat = image_lat.broadcast_mul(&d.image_mask)?;
        let text = self.conditioning_text(&prompts, &d.drop_text, dev)?;
        let noisy = self.schedule.add_noise(&target, &d.noise, &d.timesteps)?;
        let weights = match cfg.snr_gamma {
            Some(g) => Some(self.schedule.min_snr_weights(&d.timesteps, g, dev)?),
            None => None,
        };
        let (unet, ts) = (&self.unet, &d.timesteps);
        let loss = ip2p_loss_weighted(
            unet,
            &noisy,
            &image_lat,
            ts,
            &text,
            &d.noise,
            weights.as_ref(),
        )?;
        let grads = loss.backward()?;
        for (name, var) in &self.vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                let g = g.detach();
                let next = match acc.remove(name) {
                    Some(a) => (a + g)?,
                    None => g,
                };
                acc.insert(name.clone(), next);
            }
        }
        Ok(f64::from(loss.to_scalar::<f32>()?))
    }

    /// A micro-batch's random draws, its target latents (a scaled VAE sample of the edited
    /// pictures), its image latents (the input pictures' modes, unscaled) and its prompts.
    fn encodings(
        &self,
        cfg: &TrainConfig,
        micro: Micro,
    ) -> Result<(Tensor, Tensor, Vec<String>, Draws)> {
        let dev = &cfg.device;
        let n_t = self.schedule.num_train_timesteps() as u64;
        let vae = &self.frozen.vae;
        let (c, sf) = (vae.config().latent_channels, vae.config().scaling_factor);
        match micro {
            Micro::Pixels(batch) => {
                let side = cfg.resolution as usize / vae.scale_factor();
                let b = batch.prompts.len();
                let d = Draws::new(cfg, batch.first, b, [c, side, side], n_t)?;
                let target = (vae
                    .encode(&batch.edited.to_device(dev)?)?
                    .sample_with(&d.eps)?
                    * sf)?;
                let image = vae.encode(&batch.original.to_device(dev)?)?.mean;
                Ok((target, image, batch.prompts, d))
            }
            Micro::Cached { first, batch } => {
                let (h, w) = batch.mean.dims4().map(|(_, _, h, w)| (h, w))?;
                let d = Draws::new(cfg, first, batch.prompts.len(), [c, h, w], n_t)?;
                let target = ((&batch.mean + batch.std.mul(&d.eps)?)? * sf)?;
                Ok((target, batch.image, batch.prompts, d))
            }
        }
    }

    /// Micro-batch `index` of the encoding cache: its rows in epoch order, flipped where the
    /// sample's draw says.
    fn cached_micro(
        &self,
        cfg: &TrainConfig,
        cache: &EncodingCache,
        order: &mut EpochOrder,
        index: u64,
    ) -> Result<Micro> {
        let first = index * cfg.batch_size as u64;
        let globals = first..first + cfg.batch_size as u64;
        let rows: Vec<usize> = globals.clone().map(|g| order.row(g)).collect();
        let flips: Vec<bool> = globals
            .map(|g| cfg.random_flip && unit(&mut rng_for(cfg.seed, b"flip____", g)) < 0.5)
            .collect();
        Ok(Micro::Cached {
            first,
            batch: cache.batch(&rows, &flips)?,
        })
    }

    /// The prompts' encodings, the empty prompt's where `drop_text` says.
    fn conditioning_text(
        &self,
        prompts: &[String],
        drop_text: &[bool],
        dev: &Device,
    ) -> Result<Tensor> {
        let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let cached = self.cache.as_ref().and_then(|c| {
            let rows: Option<Vec<Tensor>> = prompts.iter().map(|p| c.text(p).cloned()).collect();
            rows.map(|r| Tensor::cat(&r, 0))
        });
        let text = match cached {
            Some(t) => t?,
            None => self.frozen.encode(&prompts, dev)?,
        };
        if !drop_text.iter().any(|&d| d) {
            return Ok(text);
        }
        let rows = drop_text
            .iter()
            .enumerate()
            .map(|(j, &dropped)| {
                if dropped {
                    Ok(self.frozen.empty.clone())
                } else {
                    text.narrow(0, j, 1)
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&rows, 0)?)
    }

    /// Averages the accumulated gradients over `micro` micro-batches, clips their global norm
    /// and updates the weights and the EMA. Returns the norm before clipping.
    fn clip_and_step(
        &mut self,
        cfg: &TrainConfig,
        mut acc: HashMap<String, Tensor>,
        micro: u64,
        step: u64,
    ) -> Result<f64> {
        if micro > 1 {
            for g in acc.values_mut() {
                *g = (&*g * (1.0 / micro as f64))?;
            }
        }
        let norm = clip_grad_norm(&mut acc, cfg.max_grad_norm, step)?;
        self.opt.step(&acc)?;
        if let Some(e) = &mut self.ema {
            e.update(&self.vars, step)?;
        }
        Ok(norm)
    }

    /// Edits the sample image with the serving weights (the whole UNet, or LoRA adapters on the
    /// base).
    fn sample_edit(
        &self,
        lora_cfg: Option<LoraConfig>,
        se: &SampleEdits,
        path: &Path,
    ) -> Result<()> {
        let (dir, ucfg, frozen) = (&self.dir, &self.ucfg, &self.frozen);
        let weights = &self.serving_weights()?;
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
            scheduler: self.scfg.clone(),
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

    /// `checkpoint-<step>`: the model to serve (EMA weights) and the training state (raw
    /// weights, optimizer, EMA), its `state.json` written last.
    fn write_checkpoint(&self, cfg: &TrainConfig, step: u64) -> Result<PathBuf> {
        let ck = cfg.out.join(format!("checkpoint-{step:08}"));
        let raw = snapshot(&self.vars)?;
        save_model(self.dir.root(), &self.serving_weights()?, cfg.lora, &ck)?;
        let ts = ck.join("training_state");
        std::fs::create_dir_all(&ts).map_err(io(&ts))?;
        let raw_name = if cfg.lora.is_some() {
            "lora.safetensors"
        } else {
            "unet.safetensors"
        };
        candle_core::safetensors::save(&raw, ts.join(raw_name))?;
        candle_core::safetensors::save(&self.opt.state(), ts.join("optimizer.safetensors"))?;
        if let Some(e) = &self.ema {
            candle_core::safetensors::save(&e.shadow, ts.join("ema.safetensors"))?;
        }
        let st = State {
            step,
            seed: cfg.seed,
            batch_size: cfg.batch_size,
            grad_accum: cfg.grad_accum,
            resolution: cfg.resolution,
            dataset_rows: self.data.len(),
            cache_encodings: cfg.cache_encodings,
        };
        // Written last: a checkpoint without it is incomplete and ignored by --resume.
        let json = serde_json::to_vec_pretty(&st)
            .map_err(|e| Error::Internal(format!("training state: {e}")))?;
        crate::fsutil::write_file(&ts.join("state.json"), &json)?;
        Ok(ck)
    }
}

/// The UNet with its trainable variables: LoRA adapters on frozen base weights, or the whole
/// UNet as variables; from `checkpoint`'s training state when resuming.
fn trainable_unet(
    cfg: &TrainConfig,
    dir: &ModelDir,
    ucfg: &UNetConfig,
    checkpoint: Option<&Path>,
) -> Result<(UNet2DConditionModel, Vec<(String, Var)>)> {
    let dev = &cfg.device;
    let base_weights = || dir.weights("unet", "diffusion_pytorch_model", Variant::Auto);
    let Some(lc) = cfg.lora else {
        let vars_map: VarMap = match checkpoint {
            Some(ck) => load_vars(&[ck.join("training_state/unet.safetensors")], dev)?,
            None => load_vars(&base_weights()?, dev)?,
        };
        let unet = UNet2DConditionModel::new(var_builder(&vars_map, dev), ucfg)
            .map_err(|e| Error::IncompatibleModel(format!("unet: {e}")))?;
        let mut vars: Vec<(String, Var)> = named_vars(&vars_map)?.into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        return Ok((unet, vars));
    };
    if lc.rank == 0 || !(lc.alpha.is_finite() && lc.alpha > 0.0) {
        return Err(Error::invalid("lora", "rank and alpha must be positive"));
    }
    let vb = loader::var_builder(&base_weights()?, DType::F32, dev)?;
    let mut unet = crate::models::nn::build_differentiable(|| UNet2DConditionModel::new(vb, ucfg))
        .map_err(|e| Error::IncompatibleModel(format!("unet: {e}")))?;
    let existing = checkpoint
        .map(|ck| candle_core::safetensors::load(ck.join("training_state/lora.safetensors"), dev))
        .transpose()?;
    let vars = lora::attach(&mut unet, lc, cfg.seed, dev, existing.as_ref())?;
    Ok((unet, vars))
}

/// A micro-batch's random draws, each a function of the seed and the sample's global position.
struct Draws {
    timesteps: Vec<u32>,
    /// The noise added to the target latents.
    noise: Tensor,
    /// The VAE's sampling noise for the target.
    eps: Tensor,
    /// Per sample: the text replaced by the empty prompt's encoding.
    drop_text: Vec<bool>,
    /// `[B, 1, 1, 1]`: 0 where the image latents are dropped.
    image_mask: Tensor,
}

impl Draws {
    /// Draws for `b` samples from global position `first`, latents of shape `[c, h, w]`.
    /// Conditioning dropout as the paper: r < 2p drops the text, p ≤ r < 3p the image.
    fn new(cfg: &TrainConfig, first: u64, b: usize, chw: [usize; 3], n_t: u64) -> Result<Self> {
        use crate::schedulers::{NoiseSource, SeededNoise};
        use rand_core::RngCore;
        let (dev, p) = (&cfg.device, cfg.conditioning_dropout);
        let shape = [1, chw[0], chw[1], chw[2]];
        let mut d = (
            Vec::with_capacity(b),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        for j in 0..b {
            let mut rng = rng_for(cfg.seed, b"sample__", first + j as u64);
            let r = unit(&mut rng);
            d.0.push((rng.next_u64() % n_t) as u32);
            let mut ns = SeededNoise::new(rng.next_u64());
            d.1.push(ns.randn(&shape, dev)?);
            d.2.push(ns.randn(&shape, dev)?);
            d.3.push(r < 2.0 * p);
            d.4.push(if (p..3.0 * p).contains(&r) { 0f32 } else { 1.0 });
        }
        Ok(Self {
            timesteps: d.0,
            noise: Tensor::cat(&d.1, 0)?,
            eps: Tensor::cat(&d.2, 0)?,
            drop_text: d.3,
            image_mask: Tensor::from_vec(d.4, (b, 1, 1, 1), dev)?,
        })
    }
}

/// Runs (or resumes) training. `on_step` sees every optimisation step.
pub fn train(cfg: &TrainConfig, on_step: &mut dyn FnMut(&StepLog)) -> Result<TrainSummary> {
    let mut run = Run::open(cfg)?;
    let start_step = run.start_step;
    let (mut log, log_path) = open_log(&cfg.out, start_step)?;
    let micro = cfg.grad_accum as u64;
    let rx = run
        .cache
        .is_none()
        .then(|| spawn_loader(run.data.clone(), cfg, start_step * micro, cfg.steps * micro));
    let mut order = EpochOrder::new(cfg.seed, run.data.len());
    let mut summary = TrainSummary {
        start_step,
        end_step: start_step,
        ..Default::default()
    };
    for step in start_step + 1..=cfg.steps {
        let t0 = Instant::now();
        let mut acc = HashMap::new();
        let mut loss_sum = 0f64;
        for k in 0..micro {
            let batch = match (&rx, &run.cache) {
                (Some(rx), _) => Micro::Pixels(
                    rx.recv()
                        .map_err(|_| Error::invalid("data", "the data loader stopped"))??,
                ),
                (None, Some(c)) => run.cached_micro(cfg, c, &mut order, (step - 1) * micro + k)?,
                (None, None) => return Err(Error::Internal("no data source".into())),
            };
            loss_sum += run.micro_step(cfg, batch, &mut acc)?;
        }
        let grad_norm = run.clip_and_step(cfg, acc, micro, step)?;
        let entry = StepLog {
            step,
            loss: loss_sum / micro as f64,
            grad_norm,
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
        if let Some(se) = cfg
            .samples
            .as_ref()
            .filter(|se| se.every > 0 && (step % se.every == 0 || step == cfg.steps))
        {
            let path = cfg.out.join("samples").join(format!("step-{step:08}.png"));
            run.sample_edit(cfg.lora, se, &path)?;
        }
        if step % cfg.checkpoint_every.max(1) == 0 || step == cfg.steps {
            summary.checkpoints.push(run.write_checkpoint(cfg, step)?);
        }
    }
    let final_dir = cfg.out.join("final");
    if summary.end_step > start_step || !final_dir.exists() {
        save_model(
            run.dir.root(),
            &run.serving_weights()?,
            cfg.lora,
            &final_dir,
        )?;
    }
    summary.final_model = final_dir;
    Ok(summary)
}
