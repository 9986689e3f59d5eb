//! Textual Inversion training: a new word learned from a few pictures with the model frozen,
//! as diffusers' `examples/textual_inversion/textual_inversion.py` does.
//!
//! The placeholder token (`n` vectors: `token`, `token_1`, …) is added to the tokenizer after
//! its vocabulary and its rows start as the initializer word's row. Each step encodes a random
//! template ("a photo of a {}", or the style templates) around the token, noises the VAE
//! latents of a random picture (resized square, flipped with probability ½) at a uniform
//! timestep, and takes the mean squared error of the UNet's ε-prediction; only the new rows are
//! variables (diffusers updates the whole table and restores every other row after each step:
//! the same result). An InstructPix2Pix UNet (8 input channels) gets zero image latents, its
//! "no image" condition. Output: diffusers' `learned_embeds.safetensors` (`{token: [n, D]}`)
//! and A1111's `<name>.safetensors` (`emb_params`), both readable by [`crate::loader::embeddings`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};

use super::adamw::{AdamW, AdamWConfig};
use super::NoiseSchedule;
use crate::loader::{self, ModelDir, Variant};
use crate::models::{
    ClipTextConfig, ClipTextModel, ClipTokenizer, UNet2DConditionModel, UNetConfig,
};
use crate::schedulers::noise::{rng_for, unit};
use crate::schedulers::{NoiseSource, SchedulerConfig, SeededNoise};
use crate::{Error, Result};

/// diffusers' `imagenet_templates_small` (`--learnable_property object`).
pub const OBJECT_TEMPLATES: &[&str] = &[
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
];

/// diffusers' `imagenet_style_templates_small` (`--learnable_property style`).
pub const STYLE_TEMPLATES: &[&str] = &[
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
];

/// What the token stands for: a subject or a style (the templates it is trained in).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Property {
    #[default]
    Object,
    Style,
}

impl std::str::FromStr for Property {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "object" => Ok(Self::Object),
            "style" => Ok(Self::Style),
            _ => Err(format!("unknown property `{s}` (object, style)")),
        }
    }
}

impl Property {
    pub fn templates(self) -> &'static [&'static str] {
        match self {
            Self::Object => OBJECT_TEMPLATES,
            Self::Style => STYLE_TEMPLATES,
        }
    }
}

/// One training run.
#[derive(Debug, Clone)]
pub struct EmbeddingTrainConfig {
    /// A diffusers folder or hub id (SD, or an InstructPix2Pix model).
    pub model: String,
    /// A folder of pictures of the subject or style.
    pub images: PathBuf,
    /// The new word, e.g. `<cat-toy>`.
    pub token: String,
    /// One word the tokenizer has as a single token; the new rows start as its row.
    pub initializer: String,
    pub vectors: usize,
    pub property: Property,
    /// Side of the square the pictures are resized to.
    pub resolution: u32,
    pub steps: u64,
    pub batch_size: usize,
    pub optimizer: AdamWConfig,
    pub flip: bool,
    pub seed: u64,
    pub out: PathBuf,
    /// Write `step-<n>/` every this many steps (0: only the end).
    pub save_every: u64,
    pub device: Device,
}

/// The frozen networks and the trainable rows.
pub struct TiModel {
    tokenizer: ClipTokenizer,
    text: ClipTextModel,
    unet: UNet2DConditionModel,
    unet_in: usize,
    schedule: NoiseSchedule,
    /// The embedding table cut or zero-padded to the tokenizer's length before the new tokens.
    table: Tensor,
    /// The new rows `[n, D]`.
    pub rows: Var,
    pub token: String,
    pub ids: Vec<u32>,
}

impl TiModel {
    /// Loads `dir` frozen (every layer passing gradients to its input) and adds the token's
    /// `vectors` rows, each a copy of `initializer`'s.
    pub fn new(
        dir: &ModelDir,
        token: &str,
        initializer: &str,
        vectors: usize,
        dev: &Device,
    ) -> Result<Self> {
        let mut tokenizer = ClipTokenizer::from_dir(&dir.root().join("tokenizer"))?;
        let init = tokenizer.raw_ids(initializer)?;
        let &[init_id] = init.as_slice() else {
            return Err(Error::invalid(
                "initializer",
                format!("`{initializer}` is {} tokens; it must be one", init.len()),
            ));
        };
        let first = tokenizer.vocab_len();
        let names: Vec<String> = (0..vectors.max(1))
            .map(|i| match i {
                0 => token.to_owned(),
                i => format!("{token}_{i}"),
            })
            .collect();
        let ids = tokenizer.add_embedding_tokens(&names)?;
        let (text, unet, ucfg) = frozen_networks(dir, dev)?;
        let table = text.token_table(first)?;
        let init_row = text.token_embedding().narrow(0, init_id as usize, 1)?;
        let rows = Var::from_tensor(&init_row.repeat((names.len(), 1))?)?;
        let scfg: SchedulerConfig = dir.config("scheduler", "scheduler_config.json")?;
        Ok(Self {
            tokenizer,
            text,
            unet,
            unet_in: ucfg.in_channels,
            schedule: NoiseSchedule::new(&scfg)?,
            table,
            rows,
            token: token.to_owned(),
            ids,
        })
    }

    /// Token ids `[B, 77]` of the prompts (a multi-vector token expanded).
    pub fn tokenize(&self, prompts: &[String], dev: &Device) -> Result<Tensor> {
        let mut ids = Vec::new();
        for p in prompts {
            ids.extend(self.tokenizer.encode(p)?.ids);
        }
        let t = ids.len() / prompts.len().max(1);
        Ok(Tensor::from_vec(ids, (prompts.len(), t), dev)?)
    }

    /// The text encoder's last hidden state for token ids `[B, T]`, differentiable in the rows.
    pub fn encode(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let table = Tensor::cat(&[&self.table, self.rows.as_tensor()], 0)?;
        let flat = ids.flatten_all()?.to_dtype(DType::U32)?;
        let tok = table
            .index_select(&flat, 0)?
            .reshape((b, t, table.dim(1)?))?;
        Ok(self.text.forward_embeddings(&tok)?)
    }

    /// The loss of `textual_inversion.py`: MSE between the UNet's prediction on the latents
    /// noised at `timesteps` and the noise.
    pub fn loss(
        &self,
        ids: &Tensor,
        latents: &Tensor,
        noise: &Tensor,
        timesteps: &[u32],
    ) -> Result<Tensor> {
        let text = self.encode(ids)?;
        let mut x = self.schedule.add_noise(latents, noise, timesteps)?;
        if self.unet_in == 2 * latents.dim(1)? {
            x = Tensor::cat(&[&x, &x.zeros_like()?], 1)?;
        }
        super::eps_loss(&self.unet, &x, timesteps, &text, noise)
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.schedule.num_train_timesteps()
    }
}

/// The text encoder and the UNet built from plain (frozen) tensors, differentiable in their
/// inputs.
fn frozen_networks(
    dir: &ModelDir,
    dev: &Device,
) -> Result<(ClipTextModel, UNet2DConditionModel, UNetConfig)> {
    let tcfg: ClipTextConfig = dir.config("text_encoder", "config.json")?;
    let ucfg: UNetConfig = dir.config("unet", "config.json")?;
    let tvb = loader::var_builder(
        &dir.weights("text_encoder", "model", Variant::Auto)?,
        DType::F32,
        dev,
    )?;
    let uvb = loader::var_builder(
        &dir.weights("unet", "diffusion_pytorch_model", Variant::Auto)?,
        DType::F32,
        dev,
    )?;
    let (text, unet) = crate::models::nn::build_differentiable(|| {
        Ok::<_, candle_core::Error>((
            ClipTextModel::new(tvb, &tcfg)?,
            UNet2DConditionModel::new(uvb, &ucfg)?,
        ))
    })
    .map_err(|e| Error::IncompatibleModel(format!("{}: {e}", dir.root().display())))?;
    Ok((text, unet, ucfg))
}

/// Every picture of a folder (png, jpg, jpeg, webp, bmp), in name order.
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                ["png", "jpg", "jpeg", "webp", "bmp"].contains(&e.to_ascii_lowercase().as_str())
            })
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::invalid(
            "images",
            format!("{} holds no png, jpg, webp or bmp pictures", dir.display()),
        ));
    }
    Ok(files)
}

/// Each picture's latent distribution (mean, std), unflipped and (when `flip`) flipped, as
/// `[picture][flip]`: the VAE runs once per picture and orientation.
fn encode_pictures(
    dir: &ModelDir,
    files: &[PathBuf],
    res: u32,
    flip: bool,
    dev: &Device,
) -> Result<Vec<Vec<(Tensor, Tensor)>>> {
    let vae = loader::load_vae(dir, Variant::Auto, DType::F32, dev)?;
    let limits = crate::pipeline::image::DecodeLimits::default();
    files
        .iter()
        .map(|f| {
            let img = crate::pipeline::image::open(f, &limits)?.rgb;
            let img = crate::pipeline::pil::resize_bicubic(&img, res, res);
            let mut variants = vec![img.clone()];
            if flip {
                variants.push(image::imageops::flip_horizontal(&img));
            }
            variants
                .iter()
                .map(|v| {
                    let d = vae.encode(&crate::pipeline::image::to_tensor(v, dev)?)?;
                    let std = (&d.logvar * 0.5)?.exp()?;
                    Ok((d.mean, std))
                })
                .collect()
        })
        .collect()
}

/// One step's inputs for `b` samples from the seed and the step.
struct Batch {
    prompts: Vec<String>,
    latents: Tensor,
    noise: Tensor,
    timesteps: Vec<u32>,
}

fn draw_batch(
    cfg: &EmbeddingTrainConfig,
    pictures: &[Vec<(Tensor, Tensor)>],
    scale: f64,
    n_t: usize,
    step: u64,
) -> Result<Batch> {
    use rand_core::RngCore;
    let templates = cfg.property.templates();
    let (mut prompts, mut timesteps) = (Vec::new(), Vec::new());
    let (mut lat, mut noise) = (Vec::new(), Vec::new());
    for j in 0..cfg.batch_size {
        let mut rng = rng_for(
            cfg.seed,
            b"ti_step_",
            step * cfg.batch_size as u64 + j as u64,
        );
        let pic = &pictures[(rng.next_u64() % pictures.len() as u64) as usize];
        let (mean, std) = &pic[usize::from(pic.len() > 1 && unit(&mut rng) < 0.5)];
        let t = &templates[(rng.next_u64() % templates.len() as u64) as usize];
        prompts.push(t.replace("{}", &cfg.token));
        timesteps.push((rng.next_u64() % n_t as u64) as u32);
        let mut ns = SeededNoise::new(rng.next_u64());
        let eps = ns.randn(mean.dims(), &cfg.device)?;
        lat.push(((mean + std.mul(&eps)?)? * scale)?);
        noise.push(ns.randn(mean.dims(), &cfg.device)?);
    }
    Ok(Batch {
        prompts,
        latents: Tensor::cat(&lat, 0)?,
        noise: Tensor::cat(&noise, 0)?,
        timesteps,
    })
}

/// A step's record.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EmbeddingStep {
    pub step: u64,
    pub loss: f64,
    pub seconds: f64,
}

/// Trains the embedding and writes it (and `step-<n>/` copies every `save_every` steps).
/// Returns the loss of every step.
pub fn train_embedding(
    cfg: &EmbeddingTrainConfig,
    on_step: &mut dyn FnMut(&EmbeddingStep),
) -> Result<Vec<f64>> {
    if cfg.batch_size == 0 || cfg.steps == 0 {
        return Err(Error::invalid(
            "steps",
            "steps and batch size must be positive",
        ));
    }
    let dir = ModelDir::open(&cfg.model, &Default::default())?;
    let files = image_files(&cfg.images)?;
    let model = TiModel::new(&dir, &cfg.token, &cfg.initializer, cfg.vectors, &cfg.device)?;
    let vae_cfg: crate::models::VaeConfig = dir.config("vae", "config.json")?;
    let pictures = encode_pictures(&dir, &files, cfg.resolution, cfg.flip, &cfg.device)?;
    tracing::info!(pictures = files.len(), token = %cfg.token, "Textual Inversion: pictures encoded");
    let mut opt = AdamW::new(vec![("rows".into(), model.rows.clone())], cfg.optimizer);
    std::fs::create_dir_all(&cfg.out).map_err(|e| Error::io(&cfg.out, e))?;
    let mut losses = Vec::new();
    for step in 1..=cfg.steps {
        let started = std::time::Instant::now();
        let b = draw_batch(
            cfg,
            &pictures,
            vae_cfg.scaling_factor,
            model.num_train_timesteps(),
            step,
        )?;
        let ids = model.tokenize(&b.prompts, &cfg.device)?;
        let loss = model.loss(&ids, &b.latents, &b.noise, &b.timesteps)?;
        let grads = loss.backward()?;
        let g = grads
            .get(model.rows.as_tensor())
            .ok_or_else(|| Error::Internal("no gradient reached the new rows".into()))?;
        let l = f64::from(loss.to_scalar::<f32>()?);
        if !l.is_finite() {
            return Err(Error::invalid(
                "training",
                format!("the loss is {l} at step {step}"),
            ));
        }
        opt.step(&HashMap::from([("rows".to_owned(), g.clone())]))?;
        losses.push(l);
        on_step(&EmbeddingStep {
            step,
            loss: l,
            seconds: started.elapsed().as_secs_f64(),
        });
        if cfg.save_every > 0 && step % cfg.save_every == 0 && step < cfg.steps {
            save_embedding(
                &model.token,
                model.rows.as_tensor(),
                &cfg.out.join(format!("step-{step}")),
            )?;
        }
    }
    save_embedding(&model.token, model.rows.as_tensor(), &cfg.out)?;
    Ok(losses)
}

/// `token` without the brackets people put around it: A1111 names the trigger after the file.
pub fn a1111_name(token: &str) -> String {
    let name: String = token
        .trim_matches(|c| c == '<' || c == '>')
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() {
        "embedding".into()
    } else {
        name
    }
}

/// Writes `learned_embeds.safetensors` (diffusers: `{token: [n, D]}`) and
/// `<name>.safetensors` (A1111: `emb_params`, with the trigger in the metadata) into `dir`.
pub fn save_embedding(token: &str, rows: &Tensor, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let shape = rows.dims().to_vec();
    let data: Vec<u8> = rows
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let write = |path: PathBuf, name: &str, meta: HashMap<String, String>| -> Result<()> {
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), &data)
                .map_err(|e| Error::Internal(format!("embedding tensor: {e}")))?;
        let bytes = safetensors::serialize([(name, view)], Some(meta))
            .map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?;
        crate::fsutil::write_file(&path, &bytes)
    };
    write(
        dir.join("learned_embeds.safetensors"),
        token,
        HashMap::new(),
    )?;
    let name = a1111_name(token);
    let meta = HashMap::from([("name".to_owned(), name.clone())]);
    write(dir.join(format!("{name}.safetensors")), "emb_params", meta)
}
