//! Benchmarks on full-size Stable Diffusion 1.5 / InstructPix2Pix shapes with random weights
//! (cost does not depend on the values): `ip2p bench`. One JSON line per figure, the median of
//! `reps` runs after a warm-up, in the format of `../shared/bench/bench_diffusers.py`.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::loader::read_json;
use crate::models::{
    AutoencoderKL, ClipTextConfig, ClipTextModel, UNet2DConditionModel, UNetConfig, VaeConfig,
};
use crate::Result;

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

/// Peak resident set size of this process, bytes (Linux; 0 elsewhere).
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|kib| kib * 1024)
        .unwrap_or(0)
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
    /// Any of `text`, `unet`, `vae`.
    pub only: Vec<String>,
}

fn emit(v: serde_json::Value) {
    println!("{v}");
}

/// Runs the benchmarks, printing JSON lines.
pub fn run(o: &BenchOptions) -> Result<()> {
    let dev = Device::Cpu;
    let threads = candle_core::utils::get_num_threads();
    let want = |k: &str| o.only.is_empty() || o.only.iter().any(|x| x == k);
    let cfg = |c: &str| -> std::path::PathBuf { Path::new(&o.shapes).join(c).join("config.json") };
    if want("text") {
        let c: ClipTextConfig = read_json(&cfg("text_encoder"))?;
        let te = ClipTextModel::new(random_vb(DType::F32, &dev), &c)?;
        let ids = Tensor::from_vec(
            (0..154u32).map(|i| (i * 311) % 49408).collect::<Vec<_>>(),
            (2, 77),
            &dev,
        )?;
        let s = median_secs(o.reps, || {
            te.forward(&ids)?;
            Ok(())
        })?;
        emit(
            serde_json::json!({"component": "text_encoder", "batch": 2, "s": s, "threads": threads}),
        );
    }
    if want("unet") {
        let c: UNetConfig = read_json(&cfg("unet"))?;
        let unet = UNet2DConditionModel::new(random_vb(DType::F32, &dev), &c)?;
        for &r in &o.resolutions {
            let x = Tensor::randn(0f32, 1.0, (3, c.in_channels, r / 8, r / 8), &dev)?;
            let ehs = Tensor::randn(0f32, 1.0, (3, 77, 768), &dev)?;
            let t = Tensor::new(500f32, &dev)?;
            let s = median_secs(o.reps, || {
                unet.forward(&x, &t, &ehs)?;
                Ok(())
            })?;
            emit(
                serde_json::json!({"component": "unet8_dual_cfg_step", "res": r, "batch": 3, "s": s, "threads": threads}),
            );
        }
    }
    if want("vae") {
        let c: VaeConfig = read_json(&cfg("vae"))?;
        let vae = AutoencoderKL::new(random_vb(DType::F32, &dev), &c)?;
        for &r in &o.resolutions {
            let img = Tensor::randn(0f32, 1.0, (1, 3, r, r), &dev)?;
            let z = Tensor::randn(0f32, 1.0, (1, 4, r / 8, r / 8), &dev)?;
            let s = median_secs(o.reps, || {
                vae.encode(&img)?;
                Ok(())
            })?;
            emit(
                serde_json::json!({"component": "vae_encode", "res": r, "s": s, "threads": threads}),
            );
            let s = median_secs(o.reps, || {
                vae.decode(&z)?;
                Ok(())
            })?;
            emit(
                serde_json::json!({"component": "vae_decode", "res": r, "s": s, "threads": threads}),
            );
        }
    }
    emit(serde_json::json!({"component": "peak_rss", "bytes": peak_rss_bytes()}));
    Ok(())
}
