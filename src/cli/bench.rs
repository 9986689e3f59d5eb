//! Benchmarks on full-size Stable Diffusion 1.5 / InstructPix2Pix shapes with random weights
//! (cost does not depend on the values): `ip2p bench`. One JSON line per figure, the median of
//! `reps` runs after a warm-up, in the format of `../shared/bench/bench_diffusers.py`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use clap::Args;
use ip2p::device::DeviceChoice;
use ip2p::loader::read_json;
use ip2p::models::nn::Kernels;
use ip2p::models::{
    AutoencoderKL, ClipTextConfig, ClipTextModel, UNet2DConditionModel, UNetConfig, VaeConfig,
};
use ip2p::Result;

use super::model::DTypeChoice;

/// Hands out fresh random tensors for every parameter name.
struct Random;

impl SimpleBackend for Random {
    fn get(
        &self,
        s: Shape,
        _name: &str,
        _h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        Tensor::randn(0f32, 0.02, s, dev)?.to_dtype(dtype)
    }
    fn get_unchecked(
        &self,
        _name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("random backend: shape unknown")
    }
    fn contains_tensor(&self, _name: &str) -> bool {
        false
    }
}

/// A `VarBuilder` of random weights.
pub fn random_vb(dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(Random), dtype, device.clone())
}

/// A `kB` field of `/proc/self/status`, in bytes (Linux; 0 elsewhere).
fn proc_status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|kib| kib * 1024)
        .unwrap_or(0)
}

/// Peak resident set size of this process, bytes (Linux; 0 elsewhere).
pub fn peak_rss_bytes() -> u64 {
    proc_status_bytes("VmHWM:")
}

/// Resident set size now, bytes (Linux; 0 elsewhere).
fn rss_bytes() -> u64 {
    proc_status_bytes("VmRSS:")
}

fn median_secs(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64());
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Ok(v[v.len() / 2])
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// A folder with `unet/`, `vae/`, `text_encoder/` configs (e.g. `../shared/fixtures/sd15-shapes`).
    pub shapes: std::path::PathBuf,
    pub resolutions: Vec<usize>,
    pub reps: usize,
    /// Any of `text`, `unet`, `vae` (the default set), `edit`, `load`, `gemm`, `train_full`,
    /// `train_lora`.
    pub only: Vec<String>,
    /// Denoising steps of the `edit` figure.
    pub steps: usize,
    /// A CLIP tokenizer folder (`vocab.json`, `merges.txt`) for the `edit` figure.
    pub tokenizer: std::path::PathBuf,
    /// Where the `load` figure writes its model folders (reused when already complete).
    pub weights_dir: std::path::PathBuf,
    /// A packed-weight cache folder for the `load` figure (see `LoadOptions::packed_cache`).
    pub packed_cache: Option<std::path::PathBuf>,
    /// The device of the `text`, `unet`, `vae` and `edit` figures (the others run on the CPU).
    pub device: Device,
    /// Their dtype (`None`: the device's compute dtype, f32 on the CPU, f16 on a GPU).
    pub dtype: Option<DType>,
    /// Their kernels.
    pub kernels: ip2p::models::nn::Kernels,
}

impl BenchOptions {
    fn dtype(&self) -> DType {
        self.dtype
            .unwrap_or_else(|| ip2p::device::compute_dtype(&self.device))
    }

    /// A network of config `c` with random weights, on the figures' device, dtype and kernels.
    fn random<T>(
        &self,
        build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<T>,
    ) -> Result<T> {
        let vb = random_vb(self.dtype(), &self.device);
        Ok(ip2p::models::nn::build_with_kernels(self.kernels, || {
            build(vb)
        })?)
    }

    /// What every line of the networks' figures says about where they ran.
    fn run_fields(&self) -> serde_json::Value {
        serde_json::json!({
            "device": ip2p::device::label(&self.device),
            "dtype": format!("{:?}", self.dtype()).to_lowercase(),
            "kernels": self.kernels.name(),
        })
    }
}

fn emit(v: serde_json::Value) {
    emit_with(v, &serde_json::Value::Null);
}

/// The line that opens every set: the CPU, its SIMD features and caches, and the matrix
/// product's kernel and blocks chosen for it.
fn host_line() -> serde_json::Value {
    let h = ip2p_cpu::host::host();
    let b = ip2p_cpu::sgemm::blocks();
    serde_json::json!({
        "component": "host", "vendor": h.vendor, "family": h.family, "model": h.model,
        "cpus": h.cpus, "l1d": h.l1d, "l2": h.l2, "l3": h.l3, "features": h.features,
        "sgemm_kernel": ip2p_cpu::sgemm::kernel_name(),
        "sgemm_blocks": {"mc": b.mc, "nc": b.nc, "kc": b.kc},
    })
}

/// `v` with the fields of `extra` (an object) added, and the CPU it was measured on.
fn emit_with(mut v: serde_json::Value, extra: &serde_json::Value) {
    if let Some(o) = v.as_object_mut() {
        let h = ip2p_cpu::host::host();
        o.insert("cpu".into(), h.model_name.clone().into());
        o.insert("cpu_family".into(), h.family_name().into());
    }
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        for (k, x) in e {
            o.insert(k.clone(), x.clone());
        }
    }
    println!("{v}");
    for (name, s, calls, flops) in ip2p_cpu::profile::take() {
        let rate = if flops > 0 {
            format!("{:6.1} GFLOP/s", flops as f64 / s / 1e9)
        } else {
            String::new()
        };
        eprintln!("  {name:18} {s:8.3} s in {calls:4} calls {rate}");
    }
}

/// Runs the benchmarks, printing JSON lines.
pub fn run(o: &BenchOptions) -> Result<()> {
    let want = |k: &str| o.only.is_empty() || o.only.iter().any(|x| x == k);
    // Training steps are opt-in (minutes and ~20 GB for the full UNet).
    let asked = |k: &str| o.only.iter().any(|x| x == k);
    emit(host_line());
    if want("text") {
        text_figure(o)?;
    }
    if want("unet") {
        unet_figures(o)?;
    }
    if want("vae") {
        vae_figures(o)?;
    }
    if asked("gemm") {
        gemm_figures(o.reps)?;
    }
    if asked("edit") {
        edit_figures(o)?;
    }
    for (name, variant, dtype) in [
        ("load_f16", ip2p::loader::Variant::Fp16, DType::F16),
        ("load_f32", ip2p::loader::Variant::Full, DType::F32),
    ] {
        if asked("load") || asked(name) {
            load_figure(o, name, variant, dtype)?;
        }
    }
    for (part, lora) in [("train_full", false), ("train_lora", true)] {
        if asked(part) {
            train_figures(o, part, lora)?;
        }
    }
    emit(serde_json::json!({"component": "peak_rss", "bytes": peak_rss_bytes()}));
    Ok(())
}

impl BenchOptions {
    /// The full-size config of component `c`.
    fn config(&self, c: &str) -> std::path::PathBuf {
        Path::new(&self.shapes).join(c).join("config.json")
    }

    /// Waits for what the device has queued: times count finished work.
    fn sync(&self) -> Result<()> {
        Ok(self.device.synchronize()?)
    }
}

/// The text encoder on a batch of 2 × 77 tokens.
fn text_figure(o: &BenchOptions) -> Result<()> {
    let threads = candle_core::utils::get_num_threads();
    let (dev, at) = (&o.device, o.run_fields());
    let c: ClipTextConfig = read_json(&o.config("text_encoder"))?;
    let te = o.random(|vb| ClipTextModel::new(vb, &c))?;
    let ids = Tensor::from_vec(
        (0..154u32).map(|i| (i * 311) % 49408).collect::<Vec<_>>(),
        (2, 77),
        dev,
    )?;
    let s = median_secs(o.reps, || {
        te.forward(&ids)?;
        o.sync()
    })?;
    emit_with(
        serde_json::json!({"component": "text_encoder", "batch": 2, "s": s, "threads": threads}),
        &at,
    );
    Ok(())
}

/// One dual-guidance UNet step (batch 3) at each resolution.
fn unet_figures(o: &BenchOptions) -> Result<()> {
    let threads = candle_core::utils::get_num_threads();
    let dev = &o.device;
    let (dt, at) = (o.dtype(), o.run_fields());
    let c: UNetConfig = read_json(&o.config("unet"))?;
    let unet = o.random(|vb| UNet2DConditionModel::new(vb, &c))?;
    for &r in &o.resolutions {
        let x = Tensor::randn(0f32, 1.0, (3, c.in_channels, r / 8, r / 8), dev)?.to_dtype(dt)?;
        let ehs = Tensor::randn(0f32, 1.0, (3, 77, 768), dev)?.to_dtype(dt)?;
        let t = Tensor::new(500f32, dev)?;
        let s = median_secs(o.reps, || {
            unet.forward(&x, &t, &ehs)?;
            o.sync()
        })?;
        emit_with(
            serde_json::json!({"component": "unet8_dual_cfg_step", "res": r, "batch": 3, "s": s, "threads": threads}),
            &at,
        );
    }
    Ok(())
}

/// VAE encode and decode at each resolution.
fn vae_figures(o: &BenchOptions) -> Result<()> {
    let threads = candle_core::utils::get_num_threads();
    let dev = &o.device;
    let (dt, at) = (o.dtype(), o.run_fields());
    let c: VaeConfig = read_json(&o.config("vae"))?;
    let vae = o.random(|vb| AutoencoderKL::new(vb, &c))?;
    for &r in &o.resolutions {
        let img = Tensor::randn(0f32, 1.0, (1, 3, r, r), dev)?.to_dtype(dt)?;
        let z = Tensor::randn(0f32, 1.0, (1, 4, r / 8, r / 8), dev)?.to_dtype(dt)?;
        let s = median_secs(o.reps, || {
            vae.encode(&img)?;
            o.sync()
        })?;
        emit_with(
            serde_json::json!({"component": "vae_encode", "res": r, "s": s, "threads": threads}),
            &at,
        );
        let s = median_secs(o.reps, || {
            vae.decode(&z)?;
            o.sync()
        })?;
        emit_with(
            serde_json::json!({"component": "vae_decode", "res": r, "s": s, "threads": threads}),
            &at,
        );
    }
    Ok(())
}

/// A whole edit at each resolution, with the peak resident size.
fn edit_figures(o: &BenchOptions) -> Result<()> {
    let threads = candle_core::utils::get_num_threads();
    let at = o.run_fields();
    for &r in &o.resolutions {
        let (s, peak) = edit_secs(o, r)?;
        emit_with(
            serde_json::json!({
                "component": "edit", "res": r, "steps": o.steps, "s": s, "threads": threads,
                "peak_rss_bytes": peak,
            }),
            &at,
        );
    }
    Ok(())
}

/// Start to ready from full-size random weights written as `variant` files.
fn load_figure(
    o: &BenchOptions,
    name: &str,
    variant: ip2p::loader::Variant,
    dtype: DType,
) -> Result<()> {
    let threads = candle_core::utils::get_num_threads();
    let cpu = Device::Cpu;
    let dir = o.weights_dir.join(name.trim_start_matches("load_"));
    let dev = &cpu;
    write_random_model(o, &dir, variant, dtype, dev)?;
    // Start to ready: the first load of this process (`first_s`) is what `ip2p serve`
    // does (the files are in the page cache since they were written or read before);
    // later ones (`s`, their median) may reuse memory the previous model gave back.
    // Each model is dropped outside the timing.
    let mut times = Vec::with_capacity(o.reps + 1);
    let mut anon = 0;
    let mut steps = [0f64; 2];
    for _ in 0..=o.reps.max(1) {
        let t = Instant::now();
        let md = ip2p::loader::ModelDir::from_dir(&dir)?;
        let c = ip2p::loader::load(
            &md,
            dev,
            &ip2p::loader::LoadOptions {
                variant,
                packed_cache: o.packed_cache.clone(),
                ..Default::default()
            },
        )?;
        times.push(t.elapsed().as_secs_f64());
        if times.len() == 1 {
            // What the model keeps of its own (the mapped files not counted).
            anon = proc_status_bytes("RssAnon:");
            // The first UNet step after the start against the next one (batch 3 at
            // 256 px): what reading mapped weights in for the first time costs.
            let x = Tensor::randn(0f32, 1.0, (3, c.unet.config().in_channels, 32, 32), dev)?;
            let ehs = Tensor::randn(0f32, 1.0, (3, 77, 768), dev)?;
            let tt = Tensor::new(500f32, dev)?;
            for s in &mut steps {
                let t = Instant::now();
                c.unet.forward(&x, &tt, &ehs)?;
                *s = t.elapsed().as_secs_f64();
            }
        }
        drop(c);
    }
    let first = times.remove(0);
    times.sort_by(|a, b| a.total_cmp(b));
    let s = times[times.len() / 2];
    emit(serde_json::json!({
        "component": name, "s": s, "first_s": first, "threads": threads,
        "model_anon_bytes": anon, "packed_cache": o.packed_cache.is_some(),
        "first_unet_step_s": steps[0], "next_unet_step_s": steps[1],
    }));
    Ok(())
}

/// One training step (whole UNet or LoRA) at each resolution, on the CPU.
fn train_figures(o: &BenchOptions, part: &str, lora: bool) -> Result<()> {
    let threads = candle_core::utils::get_num_threads();
    let cpu = Device::Cpu;
    let c: UNetConfig = read_json(&o.config("unet"))?;
    for &r in &o.resolutions {
        let s = train_step_secs(&c, r, lora, o.reps, &cpu)?;
        emit(serde_json::json!({
            "component": part, "res": r, "batch": 1, "s": s, "threads": threads,
            "peak_rss_bytes": peak_rss_bytes(),
        }));
    }
    Ok(())
}

/// One optimisation step (forward, backward, AdamW) on an 8-channel UNet of config `c`, batch 1:
/// the whole UNet, or rank-4 LoRA adapters on frozen weights.
fn train_step_secs(
    c: &UNetConfig,
    res: usize,
    lora: bool,
    reps: usize,
    dev: &Device,
) -> Result<f64> {
    let (unet, vars) = trainable_unet(c, lora, dev)?;
    let mut opt = ip2p::training::adamw::AdamW::new(vars.clone(), Default::default());
    let h = res / 8;
    let noisy = Tensor::randn(0f32, 1.0, (1, 4, h, h), dev)?;
    let image = Tensor::randn(0f32, 1.0, (1, 4, h, h), dev)?;
    let noise = Tensor::randn(0f32, 1.0, (1, 4, h, h), dev)?;
    let text = Tensor::randn(0f32, 1.0, (1, 77, c.cross_attention_dim.get(0)), dev)?;
    let trace = std::env::var_os("IP2P_BENCH_TRACE_MEM").is_some();
    // No warm-up: one step is minutes, and the first one is as costly as the next
    // (apart from the optimizer allocating its moments).
    let mut times = Vec::new();
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        let loss = ip2p::training::ip2p_loss(&unet, &noisy, &image, &[500], &text, &noise)?;
        trace_mem(trace, "after forward");
        let grads = loss.backward()?;
        trace_mem(trace, "after backward");
        // The graph (every activation) goes before the optimizer allocates its moments.
        drop(loss);
        if trace {
            trace_grads(&grads, &vars);
        }
        let g: std::collections::HashMap<String, Tensor> = vars
            .iter()
            .filter_map(|(k, v)| grads.get(v.as_tensor()).map(|g| (k.clone(), g.clone())))
            .collect();
        drop(grads);
        trace_mem(trace, "before the optimizer");
        opt.step(&g)?;
        trace_mem(trace, "after the optimizer");
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

/// A UNet of config `c` to train: rank-4 LoRA adapters on frozen random weights, or the whole
/// UNet as variables with real random values (so every weight is resident, as in a real run).
fn trainable_unet(
    c: &UNetConfig,
    lora: bool,
    dev: &Device,
) -> Result<(UNet2DConditionModel, Vec<(String, candle_core::Var)>)> {
    use ip2p::training::lora as lo;
    if lora {
        let mut unet = ip2p::models::nn::build_differentiable(|| {
            UNet2DConditionModel::new(random_vb(DType::F32, dev), c)
        })?;
        let cfg = lo::LoraConfig {
            rank: 4,
            alpha: 4.0,
        };
        let vars = lo::attach(&mut unet, cfg, 0, dev, None)?;
        return Ok((unet, vars));
    }
    let map = candle_nn::VarMap::new();
    let unet = UNet2DConditionModel::new(VarBuilder::from_varmap(&map, DType::F32, dev), c)?;
    let mut vars: Vec<(String, candle_core::Var)> =
        ip2p::training::named_vars(&map)?.into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, v) in &vars {
        v.set(&Tensor::randn(0f32, 0.02, v.as_tensor().dims(), dev)?)?;
    }
    Ok((unet, vars))
}

/// With `IP2P_BENCH_TRACE_MEM`: the resident and peak sizes at `when`.
fn trace_mem(on: bool, when: &str) {
    if on {
        eprintln!(
            "{when}: rss {:.2} GB, peak {:.2} GB",
            rss_bytes() as f64 / 1e9,
            peak_rss_bytes() as f64 / 1e9
        );
    }
}

/// The gradient store's size against the variables'.
fn trace_grads(grads: &candle_core::backprop::GradStore, vars: &[(String, candle_core::Var)]) {
    let ids: Vec<_> = grads.get_ids().copied().collect();
    let total: usize = ids
        .iter()
        .filter_map(|i| grads.get_id(*i))
        .map(|t| t.elem_count() * 4)
        .sum();
    let vars_b: usize = vars
        .iter()
        .map(|(_, v)| v.as_tensor().elem_count() * 4)
        .sum();
    eprintln!(
        "grad store: {} entries, {:.2} GB; variables {} ({:.2} GB)",
        ids.len(),
        total as f64 / 1e9,
        vars.len(),
        vars_b as f64 / 1e9
    );
}

/// GFLOP/s of a square f32 matrix product: ours (packed at run time) and the gemm crate's.
fn gemm_figures(reps: usize) -> Result<()> {
    use ip2p_cpu::sgemm;
    for &n in &[1024usize, 2048, 4096] {
        let a: Vec<f32> = (0..n * n).map(|i| (i % 7) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..n * n).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut c = vec![0f32; n * n];
        let flop = 2.0 * (n as f64).powi(3);
        let s = median_secs(reps, || {
            sgemm::matmul(n, n, n, &a, &b, &mut c);
            Ok(())
        })?;
        emit(serde_json::json!({"component": "sgemm", "n": n, "s": s,
            "gflops": flop / s / 1e9, "kernel": sgemm::kernel_name()}));
        let pa = sgemm::PackedA::from_rows(n, n, &a);
        let pb = sgemm::PackedB::from_transposed(n, n, &b);
        let s = median_secs(reps, || {
            sgemm::matmul_packed(&pa, &pb, &mut c);
            Ok(())
        })?;
        emit(
            serde_json::json!({"component": "sgemm_prepacked", "n": n, "s": s,
            "gflops": flop / s / 1e9}),
        );
        let s = median_secs(reps, || {
            sgemm::matmul_gemm_crate(n, &a, &b, &mut c);
            Ok(())
        })?;
        emit(
            serde_json::json!({"component": "gemm_crate", "n": n, "s": s,
            "gflops": flop / s / 1e9}),
        );
    }
    Ok(())
}

/// Components of full SD 1.5 shape with random weights (in memory), the tokenizer from `o`.
fn random_components(o: &BenchOptions) -> Result<ip2p::loader::Components> {
    let cfg = |c: &str| Path::new(&o.shapes).join(c).join("config.json");
    let tc: ClipTextConfig = read_json(&cfg("text_encoder"))?;
    let vc: VaeConfig = read_json(&cfg("vae"))?;
    let uc: UNetConfig = read_json(&cfg("unet"))?;
    Ok(ip2p::loader::Components {
        tokenizer: ip2p::models::ClipTokenizer::from_dir(&o.tokenizer)?,
        text_encoder: o.random(|vb| ClipTextModel::new(vb, &tc))?,
        vae: o.random(|vb| AutoencoderKL::new(vb, &vc))?,
        unet: o.random(|vb| UNet2DConditionModel::new(vb, &uc))?,
        scheduler: read_json(&o.shapes.join("scheduler").join("scheduler_config.json"))?,
        device: o.device.clone(),
        dtype: o.dtype(),
    })
}

/// A whole edit (`o.steps` steps, dual guidance, encode + denoise + decode) of a `res`² image:
/// median seconds and the process's peak RSS afterwards (run `--only edit --res N` alone for the
/// edit's own peak).
fn edit_secs(o: &BenchOptions, res: usize) -> Result<(f64, u64)> {
    use ip2p::pipeline::edit::{EditParams, EditPipeline};
    use ip2p::pipeline::image::InputImage;
    let pipe = EditPipeline::new(random_components(o)?)?;
    let rgb = image::RgbImage::from_fn(res as u32, res as u32, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
    });
    let input = InputImage::from_dynamic(image::DynamicImage::ImageRgb8(rgb));
    let params = EditParams {
        instruction: "turn the sunflowers into roses".into(),
        steps: o.steps,
        resolution: res as u32,
        ..Default::default()
    };
    // One edit is the warm-up as well as a long run: time every run, no extra warm-up.
    let mut times = Vec::new();
    for _ in 0..o.reps.max(1) {
        let t = Instant::now();
        pipe.edit(&input, &params, &mut ip2p::pipeline::NoProgress)?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok((times[times.len() / 2], peak_rss_bytes()))
}

/// Records every parameter a model asks for (name, shape), handing out zeros.
#[derive(Clone)]
struct Recorder(std::sync::Arc<std::sync::Mutex<Params>>);

/// Parameter names and shapes.
type Params = Vec<(String, Vec<usize>)>;

impl SimpleBackend for Recorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name.to_string(), s.dims().to_vec()));
        Tensor::zeros(s, dtype, dev)
    }
    fn get_unchecked(
        &self,
        _name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("recording backend: shape unknown")
    }
    fn contains_tensor(&self, _name: &str) -> bool {
        false
    }
}

/// The parameter names and shapes `build` asks for.
fn parameters(
    build: impl FnOnce(VarBuilder<'static>) -> Result<()>,
    dev: &Device,
) -> Result<Params> {
    let rec = Recorder(Default::default());
    build(VarBuilder::from_backend(
        Box::new(rec.clone()),
        DType::F32,
        dev.clone(),
    ))?;
    let v = std::mem::take(&mut *rec.0.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(v)
}

/// Writes a full-size diffusers folder with random weights (`dtype`, files named for `variant`)
/// unless `dir` already holds a complete one.
fn write_random_model(
    o: &BenchOptions,
    dir: &Path,
    variant: ip2p::loader::Variant,
    dtype: DType,
    dev: &Device,
) -> Result<()> {
    let done = dir.join(".complete");
    if done.is_file() {
        return Ok(());
    }
    let cfg = |c: &str| Path::new(&o.shapes).join(c).join("config.json");
    let suffix = match variant {
        ip2p::loader::Variant::Fp16 => ".fp16",
        _ => "",
    };
    let tc: ClipTextConfig = read_json(&cfg("text_encoder"))?;
    let vc: VaeConfig = read_json(&cfg("vae"))?;
    let uc: UNetConfig = read_json(&cfg("unet"))?;
    type Build<'a> = Box<dyn FnOnce(VarBuilder<'static>) -> Result<()> + 'a>;
    let parts: Vec<(&str, &str, Build)> = vec![
        (
            "text_encoder",
            "model",
            Box::new(|vb| ClipTextModel::new(vb, &tc).map(drop).map_err(Into::into)),
        ),
        (
            "vae",
            "diffusion_pytorch_model",
            Box::new(|vb| AutoencoderKL::new(vb, &vc).map(drop).map_err(Into::into)),
        ),
        (
            "unet",
            "diffusion_pytorch_model",
            Box::new(|vb| {
                UNet2DConditionModel::new(vb, &uc)
                    .map(drop)
                    .map_err(Into::into)
            }),
        ),
    ];
    for (component, stem, build) in parts {
        let tensors = random_tensors(parameters(build, dev)?, dtype, dev)?;
        let cdir = dir.join(component);
        std::fs::create_dir_all(&cdir).map_err(|e| ip2p::Error::io(&cdir, e))?;
        std::fs::copy(cfg(component), cdir.join("config.json"))
            .map_err(|e| ip2p::Error::io(&cdir, e))?;
        candle_core::safetensors::save(&tensors, cdir.join(format!("{stem}{suffix}.safetensors")))?;
    }
    copy_support_files(o, dir)?;
    std::fs::copy(
        o.shapes.join("model_index.json"),
        dir.join("model_index.json"),
    )
    .map_err(|e| ip2p::Error::io(dir, e))?;
    std::fs::write(&done, b"").map_err(|e| ip2p::Error::io(&done, e))?;
    Ok(())
}

/// Values for every parameter: any will do (cost does not depend on them), but not zeros,
/// which the kernel could leave unmapped: a cheap hash in ±0.02.
fn random_tensors(
    params: Vec<(String, Vec<usize>)>,
    dtype: DType,
    dev: &Device,
) -> Result<std::collections::HashMap<String, Tensor>> {
    use rayon::prelude::*;
    params
        .par_iter()
        .enumerate()
        .map(|(pi, (name, shape))| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|i| {
                    let h = ((i as u64) ^ ((pi as u64) << 40)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    ((h >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04
                })
                .collect();
            let t = Tensor::from_vec(v, shape.as_slice(), dev)?.to_dtype(dtype)?;
            Ok((name.clone(), t))
        })
        .collect()
}

/// The scheduler config and the tokenizer files beside the random weights.
fn copy_support_files(o: &BenchOptions, dir: &Path) -> Result<()> {
    for (sub, files) in [
        ("scheduler", vec!["scheduler_config.json"]),
        (
            "tokenizer",
            vec![
                "vocab.json",
                "merges.txt",
                "tokenizer_config.json",
                "special_tokens_map.json",
            ],
        ),
    ] {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d).map_err(|e| ip2p::Error::io(&d, e))?;
        let from = if sub == "tokenizer" {
            o.tokenizer.clone()
        } else {
            o.shapes.join(sub)
        };
        for f in files {
            if from.join(f).is_file() {
                std::fs::copy(from.join(f), d.join(f)).map_err(|e| ip2p::Error::io(&d, e))?;
            }
        }
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A folder of full-size configs (unet/, vae/, text_encoder/).
    #[arg(
        long,
        env = "IP2P_BENCH_SHAPES",
        default_value = "../shared/fixtures/sd15-shapes"
    )]
    pub shapes: PathBuf,
    /// Image sides to time the UNet and VAE at.
    #[arg(long, env = "IP2P_BENCH_RES", default_values_t = [256usize, 512], num_args = 1..)]
    pub res: Vec<usize>,
    /// Timed runs after one warm-up; the median is printed.
    #[arg(long, env = "IP2P_BENCH_REPS", default_value_t = 3)]
    pub reps: usize,
    /// Only these parts (comma-separated): text, unet, vae (the default set); edit (a whole
    /// edit at each --res), load (start-to-ready from full-size f16 and f32 files; load_f16 or
    /// load_f32 for one of them), gemm,
    /// train_full, train_lora.
    #[arg(long, env = "IP2P_BENCH_ONLY", value_delimiter = ',')]
    pub only: Vec<String>,
    /// Denoising steps of the `edit` figure.
    #[arg(long, env = "IP2P_BENCH_STEPS", default_value_t = 20)]
    pub steps: usize,
    /// A CLIP tokenizer folder for the `edit` figure.
    #[arg(
        long,
        env = "IP2P_BENCH_TOKENIZER",
        default_value = "../shared/fixtures/clip-tokenizer"
    )]
    pub tokenizer: PathBuf,
    /// Where the `load` figure writes (and reuses) its full-size random-weight model folders.
    #[arg(long, env = "IP2P_BENCH_WEIGHTS_DIR")]
    pub weights_dir: Option<PathBuf>,
    /// The `load` figure with a packed-weight cache in this folder (written by the first load
    /// when absent, mapped by the later ones).
    #[arg(long, env = "IP2P_BENCH_PACKED_CACHE")]
    pub packed_cache: Option<PathBuf>,
    /// The device of the text, unet, vae and edit figures: auto, cpu, cuda, cuda:N.
    #[arg(long, env = "IP2P_BENCH_DEVICE", default_value = "cpu")]
    pub device: DeviceChoice,
    /// Their dtype: auto (f32 on the CPU, f16 on a GPU), f32, f16, bf16.
    #[arg(long, env = "IP2P_BENCH_DTYPE", default_value = "auto")]
    pub dtype: DTypeChoice,
    /// Their kernels: auto or generic.
    #[arg(long, env = "IP2P_BENCH_KERNELS", default_value = "auto")]
    pub kernels: Kernels,
}

impl TryFrom<BenchArgs> for BenchOptions {
    type Error = anyhow::Error;

    fn try_from(a: BenchArgs) -> anyhow::Result<Self> {
        Ok(BenchOptions {
            shapes: a.shapes,
            resolutions: a.res,
            reps: a.reps,
            only: a.only,
            steps: a.steps,
            tokenizer: a.tokenizer,
            weights_dir: a
                .weights_dir
                .unwrap_or_else(|| std::env::temp_dir().join("ip2p-bench-weights")),
            packed_cache: a.packed_cache,
            device: ip2p::device::open(a.device)?,
            dtype: a.dtype.0,
            kernels: a.kernels,
        })
    }
}
