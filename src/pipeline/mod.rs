//! Pipelines: the InstructPix2Pix edit (dual classifier-free guidance) and plain text-to-image.
//!
//! Pipelines compose models and schedulers; they know nothing of gRPC, HTTP or files. Progress,
//! previews and cancellation go through [`Progress`].

pub mod adapters;
pub mod clip_score;
pub mod edit;
pub mod guidance;
pub mod image;
pub mod pil;
pub mod steps_study;
pub mod txt2img;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::Tensor;

pub use self::edit::{EditOutput, EditParams, EditPipeline, Sampling, Timings};
pub use self::guidance::{Guidance, TextCond};
pub use self::image::{DecodeLimits, InputImage, ResizePolicy};
pub use self::txt2img::{Txt2ImgParams, Txt2ImgPipeline};

/// What a progress callback sees after each denoising step.
#[derive(Debug)]
pub struct StepInfo<'a> {
    /// Steps done so far (1-based).
    pub step: usize,
    pub total: usize,
    /// The timestep just processed.
    pub timestep: f64,
    /// The latents after this step (`[B, 4, h, w]`, scaled as the scheduler keeps them).
    pub latents: &'a Tensor,
}

/// Whether to go on after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    Stop,
}

/// A per-step callback (progress bars, previews, cancellation).
pub trait Progress {
    fn on_step(&mut self, info: &StepInfo<'_>) -> Control;
}

impl<F: FnMut(&StepInfo<'_>) -> Control> Progress for F {
    fn on_step(&mut self, info: &StepInfo<'_>) -> Control {
        self(info)
    }
}

/// A random 53-bit seed (exactly representable as a JSON number), for callers that give none.
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() >> 11
}

/// The scheduler asked for, or the model's own (Euler ancestral when it names none of ours),
/// configured from the model's `scheduler_config.json`.
pub fn scheduler_for(
    c: &crate::loader::Components,
    kind: Option<crate::schedulers::SchedulerKind>,
    steps: usize,
) -> crate::Result<(
    crate::schedulers::SchedulerKind,
    Box<dyn crate::schedulers::Scheduler>,
)> {
    let kind = kind
        .or_else(|| c.scheduler.kind())
        .unwrap_or(crate::schedulers::SchedulerKind::EulerAncestral);
    Ok((kind, crate::schedulers::build(kind, &c.scheduler, steps)?))
}

/// A callback that never stops anything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn on_step(&mut self, _: &StepInfo<'_>) -> Control {
        Control::Continue
    }
}

/// A cheap, cloneable cancellation flag.
#[derive(Debug, Default, Clone)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// A fast approximate preview: latents → RGB by the usual linear projection of SD's latent
/// space (no VAE decode), `[1, 4, h, w]` → RGB8 `w × h`.
pub fn latent_preview(latents: &Tensor) -> crate::Result<::image::RgbImage> {
    const M: [[f32; 3]; 4] = [
        [0.298, 0.207, 0.208],
        [0.187, 0.286, 0.173],
        [-0.158, 0.189, 0.264],
        [-0.184, -0.271, -0.473],
    ];
    let l = latents
        .to_device(&candle_core::Device::Cpu)?
        .to_dtype(candle_core::DType::F32)?
        .get(0)?;
    let (c, h, w) = l.dims3()?;
    let v = l.flatten_all()?.to_vec1::<f32>()?;
    let mut img = ::image::RgbImage::new(w as u32, h as u32);
    for y in 0..h {
        for x in 0..w {
            let mut rgb = [0f32; 3];
            for (ch, row) in M.iter().enumerate().take(c.min(4)) {
                let val = v[ch * h * w + y * w + x];
                for k in 0..3 {
                    rgb[k] += val * row[k];
                }
            }
            let px = rgb.map(|f| ((f + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8);
            img.put_pixel(x as u32, y as u32, ::image::Rgb(px));
        }
    }
    Ok(img)
}
