//! Parity with the Python reference (diffusers / transformers, float32).
//!
//! Runs every case in `../shared/fixtures/parity/` and, when `IP2P_PARITY_DIR` names another
//! directory of cases in the same formats, those too. One line per case and mode:
//! `parity <file> [mode]: ok (max abs err …)` or the failure. An unknown kind is a failure.
//!
//! Every inference case runs in each mode of the device: on the CPU with the fused kernels
//! (`fused f32`), with candle's generic ops only (`generic f32`, exactly the graph a GPU runs)
//! and, for the cases that carry half-precision bounds (`tol_f16.<name>`, recorded by
//! `tools/gen_parity_f16.py`), that generic graph in f16 (`generic f16`). `IP2P_TEST_DEVICE`
//! (`cpu`, `cuda:0`, …) picks the device; a GPU asked for on a machine without one is reported
//! as skipped.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{fixtures, Case, Checks};
use ip2p::loader::{self, Components, LoadOptions, ModelDir};
use ip2p::models::nn::Kernels;
use ip2p::models::ClipTokenizer;
use ip2p::pipeline::clip_score::{ClipScorer, Similarities};
use ip2p::pipeline::{
    image as img, Control, EditPipeline, Guidance, Sampling, StepInfo, Txt2ImgParams,
    Txt2ImgPipeline,
};
use ip2p::schedulers::{self, ReplayNoise, SchedulerConfig, SchedulerKind};
use ip2p::training;

type R<T> = Result<T, String>;

fn e<E: std::fmt::Display>(x: E) -> String {
    x.to_string()
}

/// How a case is run: device, kernels and dtype.
#[derive(Debug, Clone)]
struct Mode {
    device: Device,
    kernels: Kernels,
    dtype: DType,
}

impl Mode {
    fn half(&self) -> bool {
        self.dtype != DType::F32
    }

    fn name(&self) -> String {
        let dev = ip2p::device::label(&self.device);
        let k = match self.kernels {
            Kernels::Auto if self.device.is_cpu() => "fused",
            _ => "generic",
        };
        format!("{dev} {k} {}", if self.half() { "f16" } else { "f32" })
    }

    fn checks(&self) -> Checks {
        Checks::new(self.half())
    }
}

struct Models {
    mode: Mode,
    cache: HashMap<String, Components>,
}

impl Models {
    fn get(&mut self, name: &str) -> R<&Components> {
        if !self.cache.contains_key(name) {
            let dir = ModelDir::from_dir(&fixtures().join(name)).map_err(e)?;
            let opts = LoadOptions {
                dtype: Some(self.mode.dtype),
                kernels: self.mode.kernels,
                ..LoadOptions::default()
            };
            let c = loader::load(&dir, &self.mode.device, &opts).map_err(e)?;
            self.cache.insert(name.to_owned(), c);
        }
        self.cache.get(name).ok_or_else(|| "model cache".into())
    }
}

fn model_for(case: &Case, default: &str) -> String {
    case.meta_str("model").unwrap_or_else(|| default.to_owned())
}

fn tokenizer_cases(path: &Path) -> R<Checks> {
    let text = std::fs::read_to_string(path).map_err(e)?;
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).map_err(e)?;
    let tok = ClipTokenizer::from_dir(&fixtures().join("clip-tokenizer")).map_err(e)?;
    let mut checks = Checks::default();
    for (i, c) in cases.iter().enumerate() {
        let t = c["text"].as_str().ok_or("case without text")?;
        let want: Vec<u32> = c["ids"]
            .as_array()
            .ok_or("case without ids")?
            .iter()
            .map(|v| v.as_u64().unwrap_or(u64::MAX) as u32)
            .collect();
        let got = tok.encode(t).map_err(e)?.ids;
        checks.count += 1;
        if got != want {
            let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
            checks.failures.push(format!(
                "case {i} {t:?}: ids differ at position {at}: got {:?}, want {:?}",
                &got[at..(at + 5).min(got.len())],
                &want[at..(at + 5).min(want.len())]
            ));
        }
    }
    Ok(checks)
}

fn components(case: &Case, models: &mut Models) -> R<Checks> {
    let mut checks = models.mode.checks();
    let c = models.get(&model_for(case, "tiny-ip2p"))?;
    // An input on the models' device, in their dtype (ids keep theirs).
    let input = |name: &str| -> R<Tensor> {
        let t = case.t(name)?.to_device(&c.device).map_err(e)?;
        if t.dtype().is_float() {
            t.to_dtype(c.dtype).map_err(e)
        } else {
            Ok(t)
        }
    };
    if case.has("input_ids") {
        let hidden = c.text_encoder.forward(&input("input_ids")?).map_err(e)?;
        checks.within(case, "text_hidden", &hidden)?;
    }
    if case.has("vae_in") {
        let dist = c.vae.encode(&input("vae_in")?).map_err(e)?;
        checks.within(case, "vae_mean", &dist.mean)?;
        checks.within(case, "vae_logvar", &dist.logvar)?;
    }
    if case.has("vae_z") {
        let dec = c.vae.decode(&input("vae_z")?).map_err(e)?;
        checks.within(case, "vae_decoded", &dec)?;
    }
    if case.has("unet_sample") {
        let t = case.meta_f64("unet_timestep").ok_or("no unet_timestep")?;
        let out = c
            .unet
            .forward(
                &input("unet_sample")?,
                &Tensor::new(t as f32, &c.device).map_err(e)?,
                &input("unet_ehs")?,
            )
            .map_err(e)?;
        checks.within(case, "unet_out", &out)?;
    }
    Ok(checks)
}

fn scheduler_of(case: &Case) -> R<(SchedulerKind, SchedulerConfig)> {
    let kind: SchedulerKind = case
        .meta_str("scheduler")
        .ok_or("no scheduler")?
        .parse()
        .map_err(e)?;
    let cfg: SchedulerConfig = match case.meta.get("scheduler_config") {
        Some(v) => serde_json::from_value(v.clone()).map_err(e)?,
        None => SchedulerConfig::default(),
    };
    Ok((kind, cfg))
}

fn replay(case: &Case) -> R<ReplayNoise> {
    let mut v = vec![case.t("init_latents")?.clone()];
    let mut i = 0;
    while let Ok(n) = case.t(&format!("noise.{i}")) {
        v.push(n.clone());
        i += 1;
    }
    Ok(ReplayNoise::new(v))
}

fn u8_image(t: &Tensor) -> R<image::RgbImage> {
    let (h, w, _) = t.dims3().map_err(e)?;
    let raw = t.flatten_all().and_then(|t| t.to_vec1::<u8>()).map_err(e)?;
    image::RgbImage::from_raw(w as u32, h as u32, raw).ok_or_else(|| "bad image".into())
}

fn check_u8(checks: &mut Checks, name: &str, out_float: &Tensor, want: &Tensor) -> R<()> {
    if checks.half {
        // No 8-bit bound is recorded for half precision; output_float's bound covers it.
        return Ok(());
    }
    let got = img::unit_hwc_to_rgb(out_float).map_err(e)?;
    let got = Tensor::from_vec(got.into_raw(), want.dims(), &Device::Cpu).map_err(e)?;
    checks.bound(
        name,
        &got.to_dtype(DType::F32).map_err(e)?,
        &want.to_dtype(DType::F32).map_err(e)?,
        1.0,
    )
}

fn timesteps_check(checks: &mut Checks, case: &Case, got: &[f64]) -> R<()> {
    if let Ok(want) = case.t("timesteps") {
        let g = Tensor::new(got, &Device::Cpu).map_err(e)?;
        checks.bound("timesteps", &g, want, 1e-3)?;
    }
    Ok(())
}

fn ip2p(case: &Case, models: &mut Models) -> R<Checks> {
    let checks = models.mode.checks();
    let c = models.get(&model_for(case, "tiny-ip2p"))?.clone();
    edit_case(case, c, checks)
}

/// A file a `personal` case names: beside its folder (`personal/parity/…` → `personal/…`),
/// in it, or in the shared `personal/` fixtures.
fn personal_file(case_path: &Path, name: &str) -> R<PathBuf> {
    let dir = case_path.parent().unwrap_or(Path::new("."));
    let candidates = [
        dir.parent().map(|p| p.join(name)),
        Some(dir.join(name)),
        Some(fixtures().join("personal").join(name)),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
        .ok_or_else(|| format!("{name}: not found beside {}", case_path.display()))
}

/// An edit with Textual Inversion embeddings and a LoRA (at its scale) loaded as diffusers'
/// `load_textual_inversion` / `load_lora_weights` + `set_adapters` do: the prompt's ids, the
/// text encoder's output and the edit.
fn personal(path: &Path, case: &Case, mode: &Mode) -> R<Checks> {
    let mut checks = mode.checks();
    let list = |key: &str| -> Vec<String> {
        case.meta
            .get(key)
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (files, tokens) = (list("textual_inversion"), list("textual_inversion_tokens"));
    let embeddings = files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            Ok(loader::embeddings::EmbeddingSpec {
                path: personal_file(path, f)?,
                token: tokens.get(i).cloned(),
            })
        })
        .collect::<R<Vec<_>>>()?;
    let loras = match case.meta_str("lora").unwrap_or_default() {
        f if f.is_empty() => Vec::new(),
        f => vec![loader::lora::LoraSpec {
            path: personal_file(path, &f)?,
            scale: case.meta_f64("lora_scale").unwrap_or(1.0),
        }],
    };
    let dir = ModelDir::from_dir(&fixtures().join(model_for(case, "tiny-ip2p"))).map_err(e)?;
    let opts = LoadOptions {
        dtype: Some(mode.dtype),
        kernels: mode.kernels,
        loras,
        embeddings,
        ..LoadOptions::default()
    };
    let c = loader::load(&dir, &mode.device, &opts).map_err(e)?;
    let prompt = case.meta_str("prompt").unwrap_or_default();
    let ids = c.tokenizer.encode(&prompt).map_err(e)?.ids;
    let want = case.t("input_ids")?.to_dtype(DType::F32).map_err(e)?;
    let got = Tensor::new(ids.as_slice(), &Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.reshape(want.dims()))
        .map_err(e)?;
    checks.bound("input_ids", &got, &want, 0.0)?;
    let ids = case.t("input_ids")?.to_device(&c.device).map_err(e)?;
    let hidden = c.text_encoder.forward(&ids).map_err(e)?;
    checks.within(case, "text_hidden", &hidden)?;
    edit_case(case, c, checks)
}

/// The edit of an `ip2p`-like case with components `c`, checked into `checks`.
fn edit_case(case: &Case, c: Components, mut checks: Checks) -> R<Checks> {
    let pipe = EditPipeline::new(c).map_err(e)?;
    let (kind, cfg) = scheduler_of(case)?;
    let steps = case.meta_f64("steps").ok_or("no steps")? as usize;
    let mut sched = schedulers::build(kind, &cfg, steps).map_err(e)?;
    timesteps_check(&mut checks, case, sched.timesteps())?;
    let image = img::to_tensor(&u8_image(case.t("image")?)?, &Device::Cpu).map_err(e)?;
    let mut noise = replay(case)?;
    let mut per_step: Vec<Tensor> = Vec::new();
    let mut progress = |info: &StepInfo<'_>| {
        per_step.push(info.latents.clone());
        Control::Continue
    };
    let out = pipe
        .edit_tensor(
            &image,
            &case.meta_str("prompt").unwrap_or_default(),
            &case.meta_str("negative_prompt").unwrap_or_default(),
            Guidance {
                text: case.meta_f64("guidance_scale").ok_or("no guidance_scale")?,
                image: case
                    .meta_f64("image_guidance_scale")
                    .ok_or("no image_guidance_scale")?,
            },
            Sampling {
                scheduler: sched.as_mut(),
                noise: &mut noise,
                progress: &mut progress,
            },
        )
        .map_err(e)?;
    for (i, l) in per_step.iter().enumerate() {
        let name = format!("latents.{i}");
        if case.has(&name) {
            checks.within(case, &name, l)?;
        }
    }
    checks.within(case, "output_float", &out)?;
    check_u8(&mut checks, "output_u8", &out, case.t("output_u8")?)?;
    if noise.remaining() != 0 {
        checks.failures.push(format!(
            "{} recorded noise tensors were not used",
            noise.remaining()
        ));
    }
    Ok(checks)
}

fn txt2img_pair(case: &Case, models: &mut Models) -> R<Checks> {
    let mut checks = models.mode.checks();
    let c = models.get(&model_for(case, "tiny-sd"))?.clone();
    let pipe = Txt2ImgPipeline::new(c).map_err(e)?;
    let (kind, cfg) = scheduler_of(case)?;
    let steps = case.meta_f64("steps").ok_or("no steps")? as usize;
    let mut sched = schedulers::build(kind, &cfg, steps).map_err(e)?;
    timesteps_check(&mut checks, case, sched.timesteps())?;
    let prompts: Vec<String> = case
        .meta
        .get("prompts")
        .and_then(|v| v.as_array())
        .ok_or("no prompts")?
        .iter()
        .map(|p| p.as_str().unwrap_or_default().to_owned())
        .collect();
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let init = case.t("init_latents")?;
    let (_, _, h, w) = init.dims4().map_err(e)?;
    let p = Txt2ImgParams {
        width: case
            .meta_f64("width")
            .map(|v| v as u32)
            .unwrap_or(w as u32 * 8),
        height: case
            .meta_f64("height")
            .map(|v| v as u32)
            .unwrap_or(h as u32 * 8),
        steps,
        guidance_scale: case.meta_f64("guidance_scale").ok_or("no guidance_scale")?,
        negative_prompt: case.meta_str("negative_prompt").unwrap_or_default(),
        scheduler: Some(kind),
        // The reference pipeline has no Prompt-to-Prompt; a case may still ask for it.
        p2p_threshold: case.meta_f64("p2p_threshold").unwrap_or(0.0),
    };
    let mut noise = replay(case)?;
    let outs = pipe
        .render_shared(
            &refs,
            &p,
            sched.as_mut(),
            &mut noise,
            &mut ip2p::pipeline::NoProgress,
        )
        .map_err(e)?;
    for (k, out) in outs.iter().enumerate() {
        checks.within(case, &format!("output_float.{k}"), out)?;
        check_u8(
            &mut checks,
            &format!("output_u8.{k}"),
            out,
            case.t(&format!("output_u8.{k}"))?,
        )?;
    }
    Ok(checks)
}

/// One training step: the noisy latents, the loss, and gradients of UNet parameters and of
/// the text encoder's token embedding.
fn train_step(case: &Case) -> R<Checks> {
    let dev = Device::Cpu;
    let dir = ModelDir::from_dir(&fixtures().join(model_for(case, "tiny-ip2p"))).map_err(e)?;
    let ucfg: ip2p::models::UNetConfig = dir.config("unet", "config.json").map_err(e)?;
    let tcfg: ip2p::models::ClipTextConfig =
        dir.config("text_encoder", "config.json").map_err(e)?;
    let scfg: SchedulerConfig = dir
        .config("scheduler", "scheduler_config.json")
        .map_err(e)?;
    let uvars = training::load_vars(
        &dir.weights("unet", "diffusion_pytorch_model", loader::Variant::Full)
            .map_err(e)?,
        &dev,
    )
    .map_err(e)?;
    let tvars = training::load_vars(
        &dir.weights("text_encoder", "model", loader::Variant::Full)
            .map_err(e)?,
        &dev,
    )
    .map_err(e)?;
    let unet = ip2p::models::UNet2DConditionModel::new(training::var_builder(&uvars, &dev), &ucfg)
        .map_err(e)?;
    let text =
        ip2p::models::ClipTextModel::new(training::var_builder(&tvars, &dev), &tcfg).map_err(e)?;
    let sched = training::NoiseSchedule::new(&scfg).map_err(e)?;
    let ts: Vec<u32> = case
        .t("timesteps")?
        .to_dtype(DType::I64)
        .map_err(e)?
        .to_vec1::<i64>()
        .map_err(e)?
        .into_iter()
        .map(|t| t as u32)
        .collect();
    let noise = case.t("noise")?;
    let noisy = sched.add_noise(case.t("target")?, noise, &ts).map_err(e)?;
    let mut checks = Checks::default();
    checks.within(case, "noisy", &noisy)?;
    let ehs = text.forward(case.t("input_ids")?).map_err(e)?;
    let loss = training::ip2p_loss(&unet, &noisy, case.t("image_latents")?, &ts, &ehs, noise)
        .map_err(e)?;
    checks.within(case, "loss", &loss.reshape(1).map_err(e)?)?;
    let grads = loss.backward().map_err(e)?;
    let uv = training::named_vars(&uvars).map_err(e)?;
    let names: Vec<String> = case
        .meta
        .get("grad_names")
        .and_then(|v| v.as_array())
        .ok_or("no grad_names")?
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    for n in &names {
        let var = uv.get(n).ok_or_else(|| format!("no UNet parameter {n}"))?;
        let g = grads
            .get(var.as_tensor())
            .ok_or_else(|| format!("no gradient reached {n}"))?;
        checks.within(case, &format!("grad.{n}"), g)?;
    }
    if case.has("grad.token_embedding_rows") {
        let tv = training::named_vars(&tvars).map_err(e)?;
        let emb = tv
            .iter()
            .find(|(k, _)| k.ends_with("embeddings.token_embedding.weight"))
            .map(|(_, v)| v.clone())
            .ok_or("no token embedding")?;
        let g = grads
            .get(emb.as_tensor())
            .ok_or("no gradient reached the token embedding")?;
        let rows = case
            .t("token_ids_with_grad")?
            .to_dtype(DType::U32)
            .map_err(e)?;
        checks.within(
            case,
            "grad.token_embedding_rows",
            &g.index_select(&rows, 0).map_err(e)?,
        )?;
    }
    Ok(checks)
}

/// A `uint8 [H, W, 3]` tensor as an image.
fn u8_rgb(t: &Tensor) -> R<image::RgbImage> {
    let (h, w, _) = t.dims3().map_err(e)?;
    let data = t.flatten_all().map_err(e)?.to_vec1::<u8>().map_err(e)?;
    image::RgbImage::from_raw(w as u32, h as u32, data).ok_or_else(|| "image size".into())
}

/// CLIP image and text towers and the four filter similarities.
fn clip(case: &Case, mode: &Mode) -> R<Checks> {
    let dir = fixtures().join(model_for(case, "tiny-clip"));
    let scorer = ip2p::models::nn::build_with_kernels(mode.kernels, || {
        ClipScorer::from_dir(&dir, &mode.device)
    })
    .map_err(e)?;
    let model = scorer.model();
    let on_dev = |n: &str| -> R<Tensor> { case.t(n)?.to_device(&mode.device).map_err(e) };
    let image = model.image_embeds(&on_dev("pixel_values")?).map_err(e)?;
    let text = model.text_embeds(&on_dev("input_ids")?).map_err(e)?;
    let mut checks = mode.checks();
    // Cases that carry the raw images check the preprocessing too.
    if case.has("images") {
        let raw = case.t("images")?;
        let n = raw.dim(0).map_err(e)?;
        let imgs = (0..n)
            .map(|i| u8_rgb(&raw.get(i).map_err(e)?))
            .collect::<R<Vec<_>>>()?;
        let refs: Vec<&image::RgbImage> = imgs.iter().collect();
        let pv = scorer.pixel_values(&refs).map_err(e)?;
        checks.within(case, "pixel_values", &pv)?;
    }
    checks.within(case, "image_embeds", &image)?;
    checks.within(case, "text_embeds", &text)?;
    let sims = Similarities::from_embeds(&image, &text).map_err(e)?;
    let got = Tensor::new(&sims.to_array(), &Device::Cpu).map_err(e)?;
    checks.within(case, "similarities", &got)?;
    // The tokenizer must produce the recorded ids from the captions too.
    if let Some(caps) = case.meta.get("captions").and_then(|v| v.as_array()) {
        let caps: Vec<&str> = caps.iter().filter_map(|c| c.as_str()).collect();
        let ids = scorer.input_ids(&caps).map_err(e)?;
        let want = case.t("input_ids")?.to_dtype(DType::F32).map_err(e)?;
        let ids = ids.to_dtype(DType::F32).map_err(e)?;
        checks.bound("input_ids_u8 (from captions)", &ids, &want, 0.0)?;
    }
    Ok(checks)
}

/// What a case file is for: run in which modes.
enum Plan {
    /// The tokenizer's cases and training steps: once, on the CPU in f32.
    Once,
    /// Inference: in every mode of the device (the half-precision ones only for cases that
    /// carry `tol_f16` bounds).
    Modes { half: bool },
}

fn plan(path: &Path) -> R<(Plan, Option<Case>)> {
    if path.extension().is_some_and(|x| x == "json") {
        return Ok((Plan::Once, None));
    }
    let case = Case::load(path)?;
    let plan = match case.kind().as_str() {
        "train_step" => Plan::Once,
        _ => Plan::Modes {
            half: case.tensors.keys().any(|k| k.starts_with("tol_f16.")),
        },
    };
    Ok((plan, Some(case)))
}

fn run_case(path: &Path, case: Option<&Case>, models: &mut Models) -> R<Checks> {
    let Some(case) = case else {
        return tokenizer_cases(path);
    };
    match case.kind().as_str() {
        "components" => components(case, models),
        "ip2p" => ip2p(case, models),
        "txt2img_pair" => txt2img_pair(case, models),
        "clip" => clip(case, &models.mode),
        "train_step" => train_step(case),
        "personal" => personal(path, case, &models.mode),
        other => Err(format!("unknown case kind `{other}`")),
    }
}

fn case_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let n = p
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    n.ends_with(".safetensors")
                        || (n.ends_with(".json") && n.starts_with("tokenizer"))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The modes of the device `IP2P_TEST_DEVICE` names (the CPU by default), or why there are
/// none.
fn modes() -> Result<Vec<Mode>, String> {
    let want = std::env::var("IP2P_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    let choice: ip2p::device::DeviceChoice = want.parse()?;
    let device = match choice {
        ip2p::device::DeviceChoice::Cpu => Device::Cpu,
        other => ip2p::device::open(other)
            .map_err(|err| format!("IP2P_TEST_DEVICE={want}: {err}"))
            .and_then(|d| match d.is_cpu() {
                true => Err(format!("IP2P_TEST_DEVICE={want}: no GPU on this machine")),
                false => Ok(d),
            })?,
    };
    let mode = |kernels, dtype| Mode {
        device: device.clone(),
        kernels,
        dtype,
    };
    Ok(if device.is_cpu() {
        vec![
            mode(Kernels::Auto, DType::F32),
            mode(Kernels::Generic, DType::F32),
            mode(Kernels::Generic, DType::F16),
        ]
    } else {
        vec![
            mode(Kernels::Auto, DType::F32),
            mode(Kernels::Auto, DType::F16),
        ]
    })
}

/// Prints a case's line; true when it passed.
fn report(name: &str, mode: &str, r: R<Checks>) -> bool {
    match r {
        Ok(c) if c.failures.is_empty() => {
            println!(
                "parity {name} [{mode}]: ok (max abs err {:.3e}, worst err/tol {:.3}, u8 levels {}, {} checks)",
                c.worst, c.worst_ratio, c.worst_levels, c.count
            );
            true
        }
        Ok(c) => {
            println!("parity {name} [{mode}]: FAILED");
            for m in c.failures {
                println!("    {m}");
            }
            false
        }
        Err(m) => {
            println!("parity {name} [{mode}]: FAILED ({m})");
            false
        }
    }
}

fn main() {
    // The shared reference cases, the project's own recorded cases (tools/gen_parity.py,
    // tools/gen_parity_f16.py), and any directory named by IP2P_PARITY_DIR.
    // (A binary carried to another machine finds the project's cases from where it runs.)
    let own = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity");
    let own = if own.is_dir() {
        own
    } else {
        PathBuf::from("tests/fixtures/parity")
    };
    let mut dirs = vec![
        fixtures().join("parity"),
        fixtures().join("personal/parity"),
        own,
    ];
    if let Ok(extra) = std::env::var("IP2P_PARITY_DIR") {
        if !extra.is_empty() {
            dirs.push(PathBuf::from(extra));
        }
    }
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let modes = match modes() {
        Ok(m) => m,
        Err(why) => {
            println!("parity: SKIPPED, every case: {why}");
            println!("parity: 0 passed, 0 failed, 1 skipped");
            return;
        }
    };
    if modes.iter().all(|m| m.device.is_cpu()) {
        println!(
            "parity: the GPU modes are SKIPPED (set IP2P_TEST_DEVICE=cuda:0 on a machine with one)"
        );
    }
    let mut models: Vec<Models> = modes
        .iter()
        .map(|m| Models {
            mode: m.clone(),
            cache: HashMap::new(),
        })
        .collect();
    let (mut passed, mut failed) = (0, 0);
    for dir in &dirs {
        let files = case_files(dir);
        if files.is_empty() {
            println!("parity {}: no cases found", dir.display());
            failed += 1;
            continue;
        }
        for f in files {
            let name = f
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if filter
                .as_ref()
                .is_some_and(|flt| !name.contains(flt.as_str()))
            {
                continue;
            }
            let (plan, case) = match plan(&f) {
                Ok(p) => p,
                Err(m) => {
                    failed += 1;
                    println!("parity {name}: FAILED ({m})");
                    continue;
                }
            };
            let runs: Vec<&mut Models> = match plan {
                Plan::Once => models.iter_mut().take(1).collect(),
                Plan::Modes { half } => models
                    .iter_mut()
                    .filter(|m| half || !m.mode.half())
                    .collect(),
            };
            for m in runs {
                let mode = m.mode.name();
                if report(&name, &mode, run_case(&f, case.as_ref(), m)) {
                    passed += 1;
                } else {
                    failed += 1;
                }
            }
        }
    }
    println!("parity: {passed} passed, {failed} failed, 0 skipped");
    if failed > 0 {
        std::process::exit(1);
    }
}
