//! `ip2p extend` and `ip2p train`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use ip2p::training::trainer::{train, TrainConfig};
use ip2p::training::vae::{train_vae, VaeTrainConfig};

use super::progress;

#[derive(Args, Debug)]
pub struct ExtendArgs {
    /// A Stable Diffusion 1.x folder or hub id.
    #[arg(long, env = "IP2P_EXTEND_FROM")]
    pub from: String,
    /// The new folder.
    #[arg(long, env = "IP2P_EXTEND_OUT")]
    pub out: PathBuf,
    /// Never download (also HF_HUB_OFFLINE=1).
    #[arg(long, env = "IP2P_OFFLINE")]
    pub offline: bool,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// An InstructPix2Pix folder (see `ip2p extend`) or hub id.
    #[arg(long, env = "IP2P_MODEL")]
    pub model: String,
    /// Parquet files or folders (dataset-gen's output, or the published datasets' layout).
    #[arg(long, env = "IP2P_TRAIN_DATA", required = true, value_delimiter = ',')]
    pub data: Vec<PathBuf>,
    /// Checkpoints, the loss log and the final model go here.
    #[arg(long, env = "IP2P_TRAIN_OUT")]
    pub out: PathBuf,
    #[arg(long, env = "IP2P_TRAIN_RESOLUTION", default_value_t = 256)]
    pub resolution: u32,
    #[arg(long, env = "IP2P_TRAIN_BATCH_SIZE", default_value_t = 4)]
    pub batch_size: usize,
    #[arg(long, env = "IP2P_TRAIN_GRAD_ACCUM", default_value_t = 1)]
    pub grad_accum: usize,
    /// Optimisation steps in total.
    #[arg(long, env = "IP2P_TRAIN_STEPS", default_value_t = 1000)]
    pub steps: u64,
    #[arg(long, env = "IP2P_TRAIN_LR", default_value_t = 1e-4)]
    pub lr: f64,
    #[arg(long, env = "IP2P_TRAIN_WEIGHT_DECAY", default_value_t = 1e-2)]
    pub weight_decay: f64,
    /// Clip the global gradient norm (0: off).
    #[arg(long, env = "IP2P_TRAIN_MAX_GRAD_NORM", default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// EMA decay of the weights (0: no EMA).
    #[arg(long, env = "IP2P_TRAIN_EMA", default_value_t = 0.9999)]
    pub ema: f64,
    #[arg(long, env = "IP2P_TRAIN_CHECKPOINT_EVERY", default_value_t = 500)]
    pub checkpoint_every: u64,
    #[arg(long, env = "IP2P_TRAIN_SEED", default_value_t = 42)]
    pub seed: u64,
    /// Centre crops instead of random ones.
    #[arg(long, env = "IP2P_TRAIN_CENTER_CROP")]
    pub center_crop: bool,
    /// No horizontal flips.
    #[arg(long, env = "IP2P_TRAIN_NO_FLIP")]
    pub no_flip: bool,
    /// Encode every row's pictures (whole, at their own size: one size for all) and every
    /// instruction once, then train on those encodings (no crops; --resolution unused).
    #[arg(long, env = "IP2P_TRAIN_CACHE_ENCODINGS")]
    pub cache_encodings: bool,
    /// Where --cache-encodings keeps the encodings for later runs (default: <out>/encodings);
    /// they are reused only while the data and the model's VAE and text encoder are unchanged.
    #[arg(long, env = "IP2P_TRAIN_ENCODINGS_DIR")]
    pub encodings_dir: Option<PathBuf>,
    /// p of the conditioning dropout (text dropped below 2p, image between p and 3p).
    #[arg(long, env = "IP2P_TRAIN_CONDITIONING_DROPOUT", default_value_t = 0.05)]
    pub conditioning_dropout: f64,
    /// Continue from the newest checkpoint in --out.
    #[arg(long, env = "IP2P_TRAIN_RESUME")]
    pub resume: bool,
    /// Train LoRA adapters of this rank on the attention projections instead of the whole UNet.
    #[arg(long, env = "IP2P_TRAIN_LORA_RANK")]
    pub lora_rank: Option<usize>,
    /// LoRA alpha (scale = alpha / rank; default: the rank).
    #[arg(long, env = "IP2P_TRAIN_LORA_ALPHA")]
    pub lora_alpha: Option<f64>,
    /// Edit --sample-image with --sample-instruction every N steps (into <out>/samples/).
    #[arg(long, env = "IP2P_TRAIN_SAMPLE_EVERY")]
    pub sample_every: Option<u64>,
    #[arg(long, env = "IP2P_TRAIN_SAMPLE_IMAGE")]
    pub sample_image: Option<PathBuf>,
    #[arg(
        long,
        env = "IP2P_TRAIN_SAMPLE_INSTRUCTION",
        default_value = "make it look like a watercolor"
    )]
    pub sample_instruction: String,
    #[arg(long, env = "IP2P_TRAIN_SAMPLE_STEPS", default_value_t = 20)]
    pub sample_steps: usize,
    /// Column names.
    #[arg(
        long,
        env = "IP2P_TRAIN_ORIGINAL_IMAGE_COLUMN",
        default_value = "original_image"
    )]
    pub original_image_column: String,
    #[arg(
        long,
        env = "IP2P_TRAIN_EDITED_IMAGE_COLUMN",
        default_value = "edited_image"
    )]
    pub edited_image_column: String,
    #[arg(
        long,
        env = "IP2P_TRAIN_EDIT_PROMPT_COLUMN",
        default_value = "edit_prompt"
    )]
    pub edit_prompt_column: String,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, env = "IP2P_DEVICE", default_value = "auto")]
    pub device: ip2p::device::DeviceChoice,
    #[arg(long, env = "IP2P_OFFLINE")]
    pub offline: bool,
    /// A LoRA file folded into the starting model, FILE[:SCALE] (kohya or PEFT; repeatable,
    /// comma-separated in the variable): the run trains from `<out>/base`, the model with the
    /// files baked into its UNet and text encoder, and every checkpoint carries them.
    #[arg(long = "lora", env = "IP2P_TRAIN_LORA", value_delimiter = ',')]
    pub loras: Vec<ip2p::loader::lora::LoraSpec>,
    /// A Textual Inversion embedding, FILE[:TOKEN] (repeatable, comma-separated in the
    /// variable): its trigger word may appear in the instructions. Edit with the trained model
    /// and the same `--embedding`.
    #[arg(
        long = "embedding",
        env = "IP2P_TRAIN_EMBEDDING",
        value_delimiter = ','
    )]
    pub embeddings: Vec<ip2p::loader::embeddings::EmbeddingSpec>,
    /// An A1111 hypernetwork, FILE[:STRENGTH], applied (frozen) to the UNet's attention while
    /// it trains; edit the result with the same `--hypernetwork`.
    #[arg(long, env = "IP2P_TRAIN_HYPERNETWORK")]
    pub hypernetwork: Option<ip2p::loader::hypernetwork::HypernetworkSpec>,
    /// Min-SNR-γ loss weighting (5 is the usual choice): the high-noise steps, where colours and
    /// layout are set, carry more of the loss. Unset: the plain ε-MSE.
    #[arg(long, env = "IP2P_TRAIN_SNR_GAMMA")]
    pub snr_gamma: Option<f64>,
}

pub fn extend(a: ExtendArgs) -> Result<()> {
    let hub = ip2p::loader::HubOptions {
        offline: a.offline,
        ..Default::default()
    };
    let dir = ip2p::loader::ModelDir::open(&a.from, &hub)?;
    ip2p::training::extend::extend(&dir, &a.out)?;
    println!("{}: UNet extended to 8 input channels", a.out.display());
    Ok(())
}

impl TryFrom<TrainArgs> for TrainConfig {
    type Error = anyhow::Error;

    fn try_from(a: TrainArgs) -> Result<Self> {
        Ok(TrainConfig {
            model: a.model,
            hub: ip2p::loader::HubOptions {
                offline: a.offline,
                ..Default::default()
            },
            data: a.data,
            columns: ip2p::training::data::Columns {
                original_image: a.original_image_column,
                edited_image: a.edited_image_column,
                edit_prompt: a.edit_prompt_column,
            },
            out: a.out,
            resolution: a.resolution,
            batch_size: a.batch_size,
            grad_accum: a.grad_accum,
            steps: a.steps,
            adam: ip2p::training::adamw::AdamWConfig {
                lr: a.lr,
                weight_decay: a.weight_decay,
                ..Default::default()
            },
            max_grad_norm: a.max_grad_norm,
            ema: (a.ema > 0.0).then_some(a.ema),
            checkpoint_every: a.checkpoint_every,
            seed: a.seed,
            center_crop: a.center_crop,
            random_flip: !a.no_flip,
            conditioning_dropout: a.conditioning_dropout,
            prefetch: 2,
            cache_encodings: a.cache_encodings,
            encodings_dir: a.encodings_dir,
            resume: a.resume,
            lora: a.lora_rank.map(|rank| ip2p::training::lora::LoraConfig {
                rank,
                alpha: a.lora_alpha.unwrap_or(rank as f64),
            }),
            samples: match (a.sample_every, a.sample_image) {
                (Some(every), Some(image)) => Some(ip2p::training::trainer::SampleEdits {
                    every,
                    image,
                    instruction: a.sample_instruction,
                    steps: a.sample_steps,
                    seed: a.seed,
                }),
                (Some(_), None) => anyhow::bail!("--sample-every needs --sample-image"),
                _ => None,
            },
            loras: a.loras,
            embeddings: a.embeddings,
            hypernetwork: a.hypernetwork,
            snr_gamma: a.snr_gamma,
            device: ip2p::device::open(a.device)?,
        })
    }
}

pub fn run(a: TrainArgs) -> Result<()> {
    let cfg = TrainConfig::try_from(a)?;
    let bar = progress::training_bar(cfg.steps);
    let s = train(&cfg, &mut |l| {
        bar.set_position(l.step);
        bar.set_message(format!("loss {:.4}", l.loss));
        if bar.is_hidden() && (l.step % 10 == 0 || l.step == 1) {
            tracing::info!(
                step = l.step,
                loss = l.loss,
                grad_norm = l.grad_norm,
                seconds = l.seconds,
                "train"
            );
        }
    })?;
    bar.finish();
    println!(
        "steps {}..{}: loss {:.4} -> {:.4}; model in {}",
        s.start_step,
        s.end_step,
        s.first_loss.unwrap_or(f64::NAN),
        s.last_loss.unwrap_or(f64::NAN),
        s.final_model.display()
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct TrainVaeArgs {
    /// The architecture: a diffusers AutoencoderKL `config.json` (any widths).
    #[arg(long, env = "IP2P_VAE_CONFIG")]
    pub config: PathBuf,
    /// Parquet files or folders; both pictures of every row are trained on.
    #[arg(long, env = "IP2P_VAE_DATA", required = true, value_delimiter = ',')]
    pub data: Vec<PathBuf>,
    /// Checkpoints, the loss log and `final/vae` go here.
    #[arg(long, env = "IP2P_VAE_OUT")]
    pub out: PathBuf,
    /// Side of the square training crops, at the pictures' own scale.
    #[arg(long, env = "IP2P_VAE_CROP", default_value_t = 128)]
    pub crop: u32,
    #[arg(long, env = "IP2P_VAE_BATCH_SIZE", default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, env = "IP2P_VAE_STEPS", default_value_t = 2000)]
    pub steps: u64,
    #[arg(long, env = "IP2P_VAE_LR", default_value_t = 1e-4)]
    pub lr: f64,
    /// Weight of the KL term against the mean squared reconstruction error.
    #[arg(long, env = "IP2P_VAE_KL_WEIGHT", default_value_t = 1e-6)]
    pub kl_weight: f64,
    /// Clip the global gradient norm (0: off).
    #[arg(long, env = "IP2P_VAE_MAX_GRAD_NORM", default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, env = "IP2P_VAE_SEED", default_value_t = 42)]
    pub seed: u64,
    #[arg(long, env = "IP2P_VAE_CHECKPOINT_EVERY", default_value_t = 250)]
    pub checkpoint_every: u64,
    /// Continue from the newest checkpoint in --out.
    #[arg(long, env = "IP2P_VAE_RESUME")]
    pub resume: bool,
    /// With --resume: continue a checkpoint made with another --crop or --batch-size (the next
    /// phase of a schedule; weights and optimizer moments carry over).
    #[arg(long, env = "IP2P_VAE_NEW_PHASE", requires = "resume")]
    pub new_phase: bool,
    /// Rows at the end of the data held out for the reconstruction PSNR.
    #[arg(long, env = "IP2P_VAE_HOLDOUT", default_value_t = 16)]
    pub holdout: usize,
    #[arg(
        long,
        env = "IP2P_VAE_ORIGINAL_IMAGE_COLUMN",
        default_value = "original_image"
    )]
    pub original_image_column: String,
    #[arg(
        long,
        env = "IP2P_VAE_EDITED_IMAGE_COLUMN",
        default_value = "edited_image"
    )]
    pub edited_image_column: String,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, env = "IP2P_DEVICE", default_value = "auto")]
    pub device: ip2p::device::DeviceChoice,
}

impl TryFrom<TrainVaeArgs> for VaeTrainConfig {
    type Error = anyhow::Error;

    fn try_from(a: TrainVaeArgs) -> Result<Self> {
        Ok(VaeTrainConfig {
            vae: ip2p::loader::read_json(&a.config)?,
            data: a.data,
            columns: ip2p::training::data::Columns {
                original_image: a.original_image_column,
                edited_image: a.edited_image_column,
                ..Default::default()
            },
            out: a.out,
            crop: a.crop,
            batch_size: a.batch_size,
            steps: a.steps,
            adam: ip2p::training::adamw::AdamWConfig {
                lr: a.lr,
                weight_decay: 0.0,
                ..Default::default()
            },
            kl_weight: a.kl_weight,
            max_grad_norm: a.max_grad_norm,
            seed: a.seed,
            checkpoint_every: a.checkpoint_every,
            resume: a.resume,
            new_phase: a.new_phase,
            holdout: a.holdout,
            device: ip2p::device::open(a.device)?,
        })
    }
}

/// `ip2p train-vae`.
pub fn run_vae(a: TrainVaeArgs) -> Result<()> {
    let cfg = VaeTrainConfig::try_from(a)?;
    let bar = progress::training_bar(cfg.steps);
    let s = train_vae(&cfg, &mut |l| {
        bar.set_position(l.step);
        bar.set_message(format!("loss {:.5}", l.loss));
        if bar.is_hidden() && (l.step % 10 == 0 || l.step == 1) {
            tracing::info!(
                step = l.step,
                loss = l.loss,
                mse = l.mse,
                kl = l.kl,
                "train-vae"
            );
        }
    })?;
    bar.finish();
    println!(
        "steps {}..{}: loss {:.5} -> {:.5}; held-out PSNR {:.2} dB; VAE in {}",
        s.start_step,
        s.end_step,
        s.first_loss.unwrap_or(f64::NAN),
        s.last_loss.unwrap_or(f64::NAN),
        s.psnr_db,
        s.final_model.display()
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct TrainEmbeddingArgs {
    /// The model the word is learned for (a diffusers folder or hub id, SD or InstructPix2Pix).
    #[arg(long, env = "IP2P_MODEL")]
    pub model: String,
    /// A folder of 3–5 (or more) pictures of the subject or style.
    #[arg(long, env = "IP2P_TI_IMAGES")]
    pub images: PathBuf,
    /// The new word, e.g. `<cat-toy>`.
    #[arg(long, env = "IP2P_TI_TOKEN")]
    pub token: String,
    /// A word the tokenizer holds as one token, close to the subject (e.g. `toy`); the new
    /// vectors start from it.
    #[arg(long, env = "IP2P_TI_INITIALIZER")]
    pub initializer: String,
    /// Vectors per word (more: more capacity, more of the 75-token prompt used).
    #[arg(long, env = "IP2P_TI_VECTORS", default_value_t = 1)]
    pub vectors: usize,
    /// object (templates "a photo of a {}") or style ("a painting in the style of {}").
    #[arg(long, env = "IP2P_TI_PROPERTY", default_value = "object")]
    pub property: ip2p::training::embedding::Property,
    /// Side of the square the pictures are resized to (512 for SD 1.5).
    #[arg(long, env = "IP2P_TI_RESOLUTION", default_value_t = 512)]
    pub resolution: u32,
    #[arg(long, env = "IP2P_TI_STEPS", default_value_t = 3000)]
    pub steps: u64,
    #[arg(long, env = "IP2P_TI_BATCH_SIZE", default_value_t = 1)]
    pub batch_size: usize,
    /// diffusers' README example: 5e-4 × batch 1 × accumulation 4 (scaled).
    #[arg(long, env = "IP2P_TI_LR", default_value_t = 2e-3)]
    pub lr: f64,
    #[arg(long, env = "IP2P_TI_WEIGHT_DECAY", default_value_t = 1e-2)]
    pub weight_decay: f64,
    /// Do not flip pictures horizontally (text, asymmetric subjects).
    #[arg(long, env = "IP2P_TI_NO_FLIP")]
    pub no_flip: bool,
    #[arg(long, env = "IP2P_TI_SEED", default_value_t = 42)]
    pub seed: u64,
    /// Also write `step-<n>/` every this many steps (0: only the end).
    #[arg(long, env = "IP2P_TI_SAVE_EVERY", default_value_t = 500)]
    pub save_every: u64,
    /// `learned_embeds.safetensors` (diffusers) and `<token>.safetensors` (A1111) go here.
    #[arg(short, long, env = "IP2P_TI_OUT")]
    pub out: PathBuf,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, env = "IP2P_DEVICE", default_value = "auto")]
    pub device: ip2p::device::DeviceChoice,
}

/// `ip2p train-embedding`.
pub fn run_embedding(a: TrainEmbeddingArgs) -> Result<()> {
    use ip2p::training::embedding::{a1111_name, train_embedding, EmbeddingTrainConfig};
    let cfg = EmbeddingTrainConfig {
        model: a.model,
        images: a.images,
        token: a.token,
        initializer: a.initializer,
        vectors: a.vectors,
        property: a.property,
        resolution: a.resolution,
        steps: a.steps,
        batch_size: a.batch_size,
        optimizer: ip2p::training::adamw::AdamWConfig {
            lr: a.lr,
            weight_decay: a.weight_decay,
            ..Default::default()
        },
        flip: !a.no_flip,
        seed: a.seed,
        out: a.out,
        save_every: a.save_every,
        device: ip2p::device::open(a.device)?,
    };
    let bar = progress::training_bar(cfg.steps);
    let losses = train_embedding(&cfg, &mut |s| {
        bar.set_position(s.step);
        bar.set_message(format!("loss {:.5}", s.loss));
        if bar.is_hidden() && (s.step % 10 == 0 || s.step == 1) {
            tracing::info!(
                step = s.step,
                loss = s.loss,
                seconds = s.seconds,
                "train-embedding"
            );
        }
    })?;
    bar.finish();
    let mean = |l: &[f64]| l.iter().sum::<f64>() / l.len().max(1) as f64;
    let k = losses.len().min(50);
    println!(
        "{} steps: mean loss {:.5} (first {k}) -> {:.5} (last {k}); {} and {}",
        losses.len(),
        mean(&losses[..k]),
        mean(&losses[losses.len() - k..]),
        cfg.out.join("learned_embeds.safetensors").display(),
        cfg.out
            .join(format!("{}.safetensors", a1111_name(&cfg.token)))
            .display(),
    );
    Ok(())
}
