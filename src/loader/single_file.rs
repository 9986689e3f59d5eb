//! Single-file checkpoints in the original LDM layout — the InstructPix2Pix release
//! (`instruct-pix2pix-00-22000.ckpt`) and nearly every A1111/ComfyUI model: `.ckpt` (a PyTorch
//! zip, read by a data-only pickle interpreter) or `.safetensors`, with the UNet under
//! `model.diffusion_model.`, the VAE under `first_stage_model.` and the CLIP text encoder under
//! `cond_stage_model.transformer.`.
//!
//! [`convert`] writes a diffusers folder: every key renamed as diffusers'
//! `convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint` / `convert_ldm_clip_checkpoint`
//! do (the UNet's EMA copy preferred when the file has one), the configurations taken from a
//! folder given with `config_from` or inferred from the shapes with Stable Diffusion 1.x's
//! defaults (`in_channels` 4, 8 or 9 from `conv_in`), the tokenizer from `config_from` or the
//! hub's `openai/clip-vit-large-patch14`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use super::HubOptions;
use crate::{Error, Result};

const UNET: &str = "model.diffusion_model.";
const VAE: &str = "first_stage_model.";
const TEXT: &str = "cond_stage_model.transformer.";

fn bad(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::IncompatibleModel(format!("{}: {msg}", path.display()))
}

/// Whether `path` names a single-file checkpoint (by its extension).
pub fn is_single_file(path: &Path) -> bool {
    path.is_file()
        && path.extension().is_some_and(|e| {
            let e = e.to_string_lossy().to_lowercase();
            ["ckpt", "safetensors", "pt", "pth"].contains(&e.as_str())
        })
}

/// Every tensor of a single file (CPU, as stored).
pub fn read_state(path: &Path) -> Result<HashMap<String, Tensor>> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if ext == "safetensors" {
        return candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| bad(path, e));
    }
    let root = super::embeddings::pickle_root(path)?;
    super::embeddings::check_globals(path, &root)?;
    let has_state_dict = matches!(&root, candle_core::pickle::Object::Dict(kv)
        if kv.iter().any(|(k, _)| *k == candle_core::pickle::Object::Unicode("state_dict".into())));
    let key = has_state_dict.then_some("state_dict");
    let pth = candle_core::pickle::PthTensors::new(path, key).map_err(|e| bad(path, e))?;
    let mut out = HashMap::new();
    for name in pth.tensor_infos().keys() {
        if let Some(t) = pth.get(name).map_err(|e| bad(path, e))? {
            out.insert(name.clone(), t);
        }
    }
    Ok(out)
}

/// The three networks' tensors under their diffusers names.
#[derive(Debug, Default)]
pub struct Converted {
    pub unet: BTreeMap<String, Tensor>,
    pub vae: BTreeMap<String, Tensor>,
    pub text_encoder: BTreeMap<String, Tensor>,
    /// Whether the UNet came from the file's EMA copy.
    pub used_ema: bool,
}

/// Renames an LDM state dict's tensors to diffusers' names.
pub fn convert_state(path: &Path, state: &HashMap<String, Tensor>) -> Result<Converted> {
    if state
        .keys()
        .any(|k| k.starts_with("cond_stage_model.model."))
    {
        return Err(bad(
            path,
            "an OpenCLIP text encoder (Stable Diffusion 2.x): only SD 1.x single files are read",
        ));
    }
    let unet_keys: Vec<&str> = state.keys().filter_map(|k| k.strip_prefix(UNET)).collect();
    if unet_keys.is_empty() {
        return Err(bad(
            path,
            format!("no `{UNET}` tensors: not a Stable Diffusion checkpoint"),
        ));
    }
    let ema = state.keys().filter(|k| k.starts_with("model_ema.")).count() > 100;
    let layout = UnetLayout::of(&unet_keys);
    let mut c = Converted {
        used_ema: ema,
        ..Default::default()
    };
    for k in unet_keys {
        let Some(name) = layout.diffusers_name(k) else {
            return Err(bad(
                path,
                format!("UNet tensor `{k}` has no diffusers name"),
            ));
        };
        let flat = format!(
            "model_ema.{}",
            format!("diffusion_model.{k}").replace('.', "")
        );
        let t = match state.get(&flat) {
            Some(t) if ema => t,
            _ => &state[&format!("{UNET}{k}")],
        };
        c.unet.insert(name, t.clone());
    }
    let vae_keys: Vec<&str> = state.keys().filter_map(|k| k.strip_prefix(VAE)).collect();
    let n_up = count_indices(&vae_keys, "decoder.up.");
    for k in vae_keys {
        let t = &state[&format!("{VAE}{k}")];
        let name = vae_name(k, n_up);
        let t = if t.rank() == 4 && is_vae_attention_projection(&name) {
            t.squeeze(3)?.squeeze(2)?
        } else {
            t.clone()
        };
        c.vae.insert(name, t);
    }
    for (k, t) in state {
        let Some(rest) = k.strip_prefix(TEXT) else {
            continue;
        };
        if rest.ends_with("position_ids") {
            continue;
        }
        let name = if rest.starts_with("text_model.") {
            rest.to_owned()
        } else {
            format!("text_model.{rest}")
        };
        c.text_encoder.insert(name, t.clone());
    }
    if c.vae.is_empty() || c.text_encoder.is_empty() {
        return Err(bad(path, "the file lacks its VAE or its text encoder"));
    }
    Ok(c)
}

/// How many distinct `prefix{i}.` indices the keys have.
fn count_indices(keys: &[&str], prefix: &str) -> usize {
    keys.iter()
        .filter_map(|k| {
            k.strip_prefix(prefix)?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |m| m + 1)
}

/// The UNet's block structure, read from its LDM keys.
struct UnetLayout {
    layers_per_block: usize,
}

impl UnetLayout {
    fn of(keys: &[&str]) -> Self {
        let inputs = count_indices(keys, "input_blocks.");
        let downsamplers = keys
            .iter()
            .filter(|k| k.starts_with("input_blocks.") && k.contains(".0.op."))
            .count()
            / 2;
        let levels = downsamplers + 1;
        Self {
            layers_per_block: (inputs / levels).saturating_sub(1).max(1),
        }
    }

    /// diffusers' name of an LDM UNet key (as `convert_ldm_unet_checkpoint`).
    fn diffusers_name(&self, k: &str) -> Option<String> {
        const FIXED: [(&str, &str); 5] = [
            ("time_embed.0.", "time_embedding.linear_1."),
            ("time_embed.2.", "time_embedding.linear_2."),
            ("input_blocks.0.0.", "conv_in."),
            ("out.0.", "conv_norm_out."),
            ("out.2.", "conv_out."),
        ];
        for (l, d) in FIXED {
            if let Some(rest) = k.strip_prefix(l) {
                return Some(format!("{d}{rest}"));
            }
        }
        if let Some(rest) = k.strip_prefix("middle_block.") {
            let (i, rest) = rest.split_once('.')?;
            return match i {
                "0" => Some(format!("mid_block.resnets.0.{}", resnet_part(rest)?)),
                "1" => Some(format!("mid_block.attentions.0.{rest}")),
                "2" => Some(format!("mid_block.resnets.1.{}", resnet_part(rest)?)),
                _ => None,
            };
        }
        let per = self.layers_per_block + 1;
        let (block, idx, sub, rest) = split_block(k)?;
        match (block, sub) {
            ("input_blocks", 0) if rest.starts_with("op.") => Some(format!(
                "down_blocks.{}.downsamplers.0.conv.{}",
                idx / per - 1,
                &rest[3..]
            )),
            ("input_blocks", 0) => Some(format!(
                "down_blocks.{}.resnets.{}.{}",
                (idx - 1) / per,
                (idx - 1) % per,
                resnet_part(rest)?
            )),
            ("input_blocks", 1) => Some(format!(
                "down_blocks.{}.attentions.{}.{rest}",
                (idx - 1) / per,
                (idx - 1) % per
            )),
            ("output_blocks", 0) => Some(format!(
                "up_blocks.{}.resnets.{}.{}",
                idx / per,
                idx % per,
                resnet_part(rest)?
            )),
            ("output_blocks", 1 | 2) if rest.starts_with("conv.") => Some(format!(
                "up_blocks.{}.upsamplers.0.conv.{}",
                idx / per,
                &rest[5..]
            )),
            ("output_blocks", 1) => Some(format!(
                "up_blocks.{}.attentions.{}.{rest}",
                idx / per,
                idx % per
            )),
            _ => None,
        }
    }
}

/// `input_blocks.4.1.rest` → `("input_blocks", 4, 1, "rest")`.
fn split_block(k: &str) -> Option<(&str, usize, usize, &str)> {
    let (block, rest) = k.split_once('.')?;
    let (idx, rest) = rest.split_once('.')?;
    let (sub, rest) = rest.split_once('.')?;
    Some((block, idx.parse().ok()?, sub.parse().ok()?, rest))
}

/// A resnet's inner names (`in_layers.0` → `norm1`, …).
fn resnet_part(rest: &str) -> Option<String> {
    const MAP: [(&str, &str); 6] = [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("emb_layers.1.", "time_emb_proj."),
        ("skip_connection.", "conv_shortcut."),
    ];
    MAP.iter()
        .find_map(|(l, d)| rest.strip_prefix(l).map(|r| format!("{d}{r}")))
}

/// diffusers' name of an LDM VAE key (as `convert_ldm_vae_checkpoint`).
fn vae_name(k: &str, n_up: usize) -> String {
    let k = k.replace("nin_shortcut", "conv_shortcut");
    let parts: Vec<&str> = k.split('.').collect();
    match parts.as_slice() {
        [side @ ("encoder" | "decoder"), "mid", blk, rest @ ..] if blk.starts_with("block_") => {
            let i: usize = blk[6..].parse().unwrap_or(1);
            format!("{side}.mid_block.resnets.{}.{}", i - 1, rest.join("."))
        }
        [side @ ("encoder" | "decoder"), "mid", "attn_1", rest @ ..] => {
            let rest = match rest.join(".").as_str() {
                r if r.starts_with("norm.") => r.replacen("norm.", "group_norm.", 1),
                r if r.starts_with("proj_out.") => r.replacen("proj_out.", "to_out.0.", 1),
                r => format!("to_{r}"),
            };
            format!("{side}.mid_block.attentions.0.{rest}")
        }
        ["encoder", "down", i, "block", j, rest @ ..] => {
            format!("encoder.down_blocks.{i}.resnets.{j}.{}", rest.join("."))
        }
        ["encoder", "down", i, "downsample", rest @ ..] => {
            format!("encoder.down_blocks.{i}.downsamplers.0.{}", rest.join("."))
        }
        ["decoder", "up", i, "block", j, rest @ ..] => {
            let b = n_up - 1 - i.parse::<usize>().unwrap_or(0);
            format!("decoder.up_blocks.{b}.resnets.{j}.{}", rest.join("."))
        }
        ["decoder", "up", i, "upsample", rest @ ..] => {
            let b = n_up - 1 - i.parse::<usize>().unwrap_or(0);
            format!("decoder.up_blocks.{b}.upsamplers.0.{}", rest.join("."))
        }
        [side @ ("encoder" | "decoder"), "norm_out", rest @ ..] => {
            format!("{side}.conv_norm_out.{}", rest.join("."))
        }
        _ => k,
    }
}

fn is_vae_attention_projection(name: &str) -> bool {
    name.contains("mid_block.attentions.0.")
        && [
            "to_q.weight",
            "to_k.weight",
            "to_v.weight",
            "to_out.0.weight",
        ]
        .iter()
        .any(|s| name.ends_with(s))
}

/// Where the configurations and the tokenizer come from.
#[derive(Debug, Clone, Default)]
pub struct ConvertOptions {
    /// A diffusers folder or hub id whose `*/config.json`, tokenizer and scheduler are used
    /// (`in_channels` still follows the file's `conv_in`); `None`: inferred, SD 1.x defaults.
    pub config_from: Option<String>,
    pub hub: HubOptions,
}

/// Converts a single file into a diffusers folder at `out`.
pub fn convert(file: &Path, out: &Path, opts: &ConvertOptions) -> Result<()> {
    let state = read_state(file)?;
    let c = convert_state(file, &state)?;
    drop(state);
    let from = opts
        .config_from
        .as_deref()
        .map(|s| super::ModelDir::open(s, &opts.hub))
        .transpose()?;
    // A part the folder lacks is inferred (a folder may give just the tokenizer).
    let from_json = |part: &str, name: &str| -> Result<Option<Value>> {
        from.as_ref()
            .map(|d| d.root().join(part).join(name))
            .filter(|p| p.is_file())
            .map(|p| super::read_json::<Value>(&p))
            .transpose()
    };
    let mut unet = from_json("unet", "config.json")?.unwrap_or_else(|| infer_unet(&c.unet));
    unet["in_channels"] = json!(dim(&c.unet, "conv_in.weight", 1)?);
    let vae = from_json("vae", "config.json")?.unwrap_or_else(|| infer_vae(&c.vae));
    let text = match from_json("text_encoder", "config.json")? {
        Some(v) => v,
        None => infer_text(&c.text_encoder)?,
    };
    let ip2p = unet["in_channels"] == json!(8);
    let sched =
        from_json("scheduler", "scheduler_config.json")?.unwrap_or_else(|| default_scheduler(ip2p));
    let tokenizer = match &from {
        Some(d) => d.root().join("tokenizer"),
        None => clip_tokenizer(&opts.hub)?,
    };
    write_folder(
        out,
        &c,
        [("unet", unet), ("vae", vae), ("text_encoder", text)],
        sched,
        &tokenizer,
        ip2p,
    )?;
    tracing::info!(file = %file.display(), out = %out.display(), ema = c.used_ema, "single file converted");
    Ok(())
}

fn dim(t: &BTreeMap<String, Tensor>, name: &str, d: usize) -> Result<usize> {
    t.get(name)
        .ok_or_else(|| Error::IncompatibleModel(format!("single file: no `{name}`")))?
        .dim(d)
        .map_err(Error::from)
}

/// The UNet's configuration from its shapes (SD 1.x: 8 heads, 32 groups).
fn infer_unet(u: &BTreeMap<String, Tensor>) -> Value {
    let levels = (0..)
        .take_while(|b| u.contains_key(&format!("down_blocks.{b}.resnets.0.conv1.weight")))
        .count();
    let width = |b: usize| {
        u.get(&format!("down_blocks.{b}.resnets.0.conv1.weight"))
            .and_then(|t| t.dim(0).ok())
            .unwrap_or(0)
    };
    let has = |p: String| u.keys().any(|k| k.starts_with(&p));
    let lpb = (0..)
        .take_while(|l| u.contains_key(&format!("down_blocks.0.resnets.{l}.conv1.weight")))
        .count();
    let cross = u
        .iter()
        .find(|(k, _)| k.ends_with("attn2.to_k.weight"))
        .and_then(|(_, t)| t.dim(1).ok())
        .unwrap_or(768);
    let linear = u
        .iter()
        .find(|(k, _)| k.ends_with("proj_in.weight"))
        .is_some_and(|(_, t)| t.rank() == 2);
    json!({
        "_class_name": "UNet2DConditionModel",
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": u.get("conv_out.weight").and_then(|t| t.dim(0).ok()).unwrap_or(4),
        "block_out_channels": (0..levels).map(width).collect::<Vec<_>>(),
        "layers_per_block": lpb,
        "down_block_types": (0..levels).map(|b| if has(format!("down_blocks.{b}.attentions.")) { "CrossAttnDownBlock2D" } else { "DownBlock2D" }).collect::<Vec<_>>(),
        "up_block_types": (0..levels).map(|b| if has(format!("up_blocks.{b}.attentions.")) { "CrossAttnUpBlock2D" } else { "UpBlock2D" }).collect::<Vec<_>>(),
        "attention_head_dim": 8,
        "cross_attention_dim": cross,
        "norm_num_groups": 32,
        "use_linear_projection": linear,
    })
}

/// The VAE's configuration from its shapes (SD 1.x's scaling factor).
fn infer_vae(v: &BTreeMap<String, Tensor>) -> Value {
    let levels = (0..)
        .take_while(|b| v.contains_key(&format!("encoder.down_blocks.{b}.resnets.0.conv1.weight")))
        .count();
    let width = |b: usize| {
        v.get(&format!("encoder.down_blocks.{b}.resnets.0.conv1.weight"))
            .and_then(|t| t.dim(0).ok())
            .unwrap_or(0)
    };
    let lpb = (0..)
        .take_while(|l| v.contains_key(&format!("encoder.down_blocks.0.resnets.{l}.conv1.weight")))
        .count();
    let d = |k: &str, i: usize, dflt: usize| v.get(k).and_then(|t| t.dim(i).ok()).unwrap_or(dflt);
    json!({
        "_class_name": "AutoencoderKL",
        "in_channels": d("encoder.conv_in.weight", 1, 3),
        "out_channels": d("decoder.conv_out.weight", 0, 3),
        "block_out_channels": (0..levels).map(width).collect::<Vec<_>>(),
        "down_block_types": vec!["DownEncoderBlock2D"; levels],
        "up_block_types": vec!["UpDecoderBlock2D"; levels],
        "layers_per_block": lpb,
        "latent_channels": d("post_quant_conv.weight", 0, 4),
        "norm_num_groups": 32,
        "scaling_factor": 0.18215,
        "sample_size": 512,
    })
}

/// CLIP's text configuration from its shapes (64-wide heads, as CLIP ViT-L/14's).
fn infer_text(t: &BTreeMap<String, Tensor>) -> Result<Value> {
    let (vocab, hidden) = t
        .get("text_model.embeddings.token_embedding.weight")
        .ok_or_else(|| Error::IncompatibleModel("single file: no token embedding".into()))?
        .dims2()?;
    let layers = (0..)
        .take_while(|l| t.contains_key(&format!("text_model.encoder.layers.{l}.mlp.fc1.weight")))
        .count();
    Ok(json!({
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": dim(t, "text_model.encoder.layers.0.mlp.fc1.weight", 0)?,
        "num_hidden_layers": layers,
        "num_attention_heads": (hidden / 64).max(1),
        "max_position_embeddings": dim(t, "text_model.embeddings.position_embedding.weight", 0)?,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    }))
}

/// SD 1.x's noise schedule; Euler ancestral for an InstructPix2Pix UNet (as the released
/// pipeline), PNDM otherwise.
fn default_scheduler(ip2p: bool) -> Value {
    let mut s = json!({
        "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
        "steps_offset": 1, "timestep_spacing": "leading",
    });
    s["_class_name"] = json!(if ip2p {
        "EulerAncestralDiscreteScheduler"
    } else {
        "PNDMScheduler"
    });
    if !ip2p {
        s["skip_prk_steps"] = json!(true);
    }
    s
}

/// The tokenizer of CLIP ViT-L/14 (SD 1.x's) from the hub cache, fetched if needed.
fn clip_tokenizer(hub: &HubOptions) -> Result<PathBuf> {
    let files = ["vocab.json", "merges.txt"];
    super::hub::resolve_hub_files("openai/clip-vit-large-patch14", hub, &files, &[]).map_err(|e| {
        Error::ModelNotFound(format!(
            "a single file has no tokenizer; CLIP ViT-L/14's (openai/clip-vit-large-patch14) was not found ({e}): run `ip2p convert FILE OUT --config-from <a diffusers SD 1.x folder>` instead"
        ))
    })
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let s = serde_json::to_string_pretty(v).map_err(|e| Error::invalid("config", e.to_string()))?;
    std::fs::write(path, s).map_err(|e| Error::io(path, e))
}

/// The diffusers folder: weights, configurations, tokenizer, scheduler, `model_index.json`.
fn write_folder(
    out: &Path,
    c: &Converted,
    configs: [(&str, Value); 3],
    scheduler: Value,
    tokenizer: &Path,
    ip2p: bool,
) -> Result<()> {
    let weights = [
        ("unet", "diffusion_pytorch_model.safetensors", &c.unet),
        ("vae", "diffusion_pytorch_model.safetensors", &c.vae),
        ("text_encoder", "model.safetensors", &c.text_encoder),
    ];
    for ((part, file, tensors), (_, cfg)) in weights.iter().zip(configs.iter()) {
        let dir = out.join(part);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let map: HashMap<String, Tensor> = tensors
            .iter()
            .map(|(k, t)| Ok((k.clone(), t.contiguous()?)))
            .collect::<Result<_>>()?;
        candle_core::safetensors::save(&map, dir.join(file))?;
        write_json(&dir.join("config.json"), cfg)?;
    }
    let sdir = out.join("scheduler");
    std::fs::create_dir_all(&sdir).map_err(|e| Error::io(&sdir, e))?;
    write_json(&sdir.join("scheduler_config.json"), &scheduler)?;
    let tdir = out.join("tokenizer");
    std::fs::create_dir_all(&tdir).map_err(|e| Error::io(&tdir, e))?;
    for f in [
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        let src = tokenizer.join(f);
        if src.is_file() {
            std::fs::copy(&src, tdir.join(f)).map_err(|e| Error::io(&src, e))?;
        }
    }
    let class = if ip2p {
        "StableDiffusionInstructPix2PixPipeline"
    } else {
        "StableDiffusionPipeline"
    };
    write_json(
        &out.join("model_index.json"),
        &json!({
            "_class_name": class,
            "scheduler": ["diffusers", scheduler["_class_name"]],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }),
    )
}
