//! The InstructPix2Pix edit pipeline (diffusers' `StableDiffusionInstructPix2PixPipeline`).
//!
//! Per step, one batched UNet call on (text + image, image only, neither): text conditioning
//! `[c, u, u]` and image latents `[z, z, 0]`, then
//! `ε = ε∅ + s_T·(ε_TI − ε_I) + s_I·(ε_I − ε∅)`.

use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};
use image::DynamicImage;

use super::guidance::{Guidance, TextCond};
use super::image::{self as img, InputImage, ResizePolicy};
use super::{Control, Progress, StepInfo};
use crate::loader::Components;
use crate::schedulers::{div_s, NoiseSource, Scheduler, SchedulerKind, SeededNoise};
use crate::{Error, Result};

/// The paper's `s_T`: how strongly an edit follows the instruction by default.
pub const DEFAULT_TEXT_GUIDANCE: f64 = 7.5;
/// The paper's `s_I`: how strongly an edit stays close to the input image by default.
pub const DEFAULT_IMAGE_GUIDANCE: f64 = 1.5;

/// Everything a caller chooses about one edit.
#[derive(Debug, Clone, PartialEq)]
pub struct EditParams {
    pub instruction: String,
    /// Replaces the empty prompt as the unconditional text ("" = none).
    pub negative_prompt: String,
    pub steps: usize,
    /// `s_T`: how strongly to follow the instruction.
    pub text_guidance: f64,
    /// `s_I`: how strongly to stay close to the input image.
    pub image_guidance: f64,
    /// `None`: the model's own scheduler config.
    pub scheduler: Option<SchedulerKind>,
    pub seed: u64,
    /// Target long side for the `paper` policy.
    pub resolution: u32,
    pub resize: ResizePolicy,
    /// Return the image at the working resolution instead of the input's own size.
    pub keep_working_size: bool,
}

impl Default for EditParams {
    /// The paper's defaults: 100 steps, text 7.5, image 1.5, Euler ancestral, 512 px.
    fn default() -> Self {
        Self {
            instruction: String::new(),
            negative_prompt: String::new(),
            steps: 100,
            text_guidance: DEFAULT_TEXT_GUIDANCE,
            image_guidance: DEFAULT_IMAGE_GUIDANCE,
            scheduler: None,
            seed: 0,
            resolution: 512,
            resize: ResizePolicy::Paper,
            keep_working_size: false,
        }
    }
}

/// The machinery of one denoising run: the scheduler, the noise it and the start draw from,
/// and who hears of every step.
pub struct Sampling<'a> {
    pub scheduler: &'a mut dyn Scheduler,
    pub noise: &'a mut dyn NoiseSource,
    pub progress: &'a mut dyn Progress,
}

impl EditParams {
    /// The two guidance scales.
    pub fn guidance(&self) -> Guidance {
        Guidance {
            text: self.text_guidance,
            image: self.image_guidance,
        }
    }

    /// Range checks that do not need the model.
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 || self.steps > 1000 {
            return Err(Error::invalid(
                "steps",
                format!("{} is outside 1..=1000", self.steps),
            ));
        }
        for (field, v) in [
            ("text_guidance", self.text_guidance),
            ("image_guidance", self.image_guidance),
        ] {
            if !v.is_finite() || !(0.0..=100.0).contains(&v) {
                return Err(Error::invalid(
                    field,
                    format!("{v} is not a finite number in 0..=100"),
                ));
            }
        }
        if !(64..=2048).contains(&self.resolution) {
            return Err(Error::invalid(
                "resolution",
                format!("{} is outside 64..=2048", self.resolution),
            ));
        }
        Ok(())
    }
}

/// Where the time went.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    /// Text and image encoding.
    pub encode: Duration,
    pub denoise: Duration,
    pub decode: Duration,
}

/// The result of an edit.
#[derive(Debug, Clone)]
pub struct EditOutput {
    /// RGB, or RGBA when the input had alpha.
    pub image: DynamicImage,
    pub seed: u64,
    /// The size the model worked at.
    pub working_size: (u32, u32),
    /// Instruction tokens cut to fit CLIP's 77.
    pub truncated_tokens: usize,
    pub scheduler: SchedulerKind,
    pub timings: Timings,
}

/// The edit pipeline around loaded components.
#[derive(Debug, Clone)]
pub struct EditPipeline {
    c: Components,
}

impl EditPipeline {
    /// Checks that the UNet takes noisy latents plus image latents.
    pub fn new(c: Components) -> Result<Self> {
        let latent = c.vae.config().latent_channels;
        let want = 2 * latent;
        let got = c.unet.config().in_channels;
        if got != want {
            return Err(Error::IncompatibleModel(format!(
                "an edit needs a UNet with {want} input channels ({latent} noisy latents + {latent} image latents), \
                 this one has {got}: it is not an InstructPix2Pix model (use `ip2p extend` to make one from Stable Diffusion)"
            )));
        }
        Ok(Self { c })
    }

    pub fn components(&self) -> &Components {
        &self.c
    }

    /// The scheduler the model ships with, or the kind asked for, configured from the model's
    /// `scheduler_config.json`.
    pub fn scheduler(
        &self,
        kind: Option<SchedulerKind>,
        steps: usize,
    ) -> Result<(SchedulerKind, Box<dyn Scheduler>)> {
        super::scheduler_for(&self.c, kind, steps)
    }

    /// CLIP encoding `[1, 77, D]` of `text`, and how many tokens were truncated.
    pub fn encode_prompt(&self, text: &str) -> Result<(Tensor, usize)> {
        encode_prompt(&self.c, text)
    }

    /// The image latents the UNet conditions on: the VAE's mode, *not* scaled.
    pub fn encode_image(&self, image: &Tensor) -> Result<Tensor> {
        let x = image.to_device(&self.c.device)?.to_dtype(self.c.dtype)?;
        Ok(self.c.vae.encode(&x)?.mean)
    }

    /// Raw decoder output for scheduler latents (divided by the scaling factor first).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        decode(&self.c, latents)
    }

    /// Runs the denoising loop. `image_latents: [1, 4, h, w]`. The starting latents are drawn
    /// from `run.noise` first, then whatever the scheduler draws.
    pub fn denoise(
        &self,
        image_latents: &Tensor,
        text: &TextCond,
        guidance: Guidance,
        run: Sampling<'_>,
    ) -> Result<Tensor> {
        // The sample, the scheduler's arithmetic and the guidance stay in f32 whatever the
        // UNet computes in (f16 on a GPU): cast at the UNet's input and output, as diffusers'
        // schedulers upcast.
        let Sampling {
            scheduler,
            noise,
            progress,
        } = run;
        let dev = &self.c.device;
        let image_latents = &image_latents.to_dtype(DType::F32)?;
        let (_, lc, h, w) = image_latents.dims4()?;
        let guided = guidance.enabled();
        let (context, img_lat) = if guided {
            let (c, u) = (&text.cond, &text.uncond);
            let zeros = image_latents.zeros_like()?;
            (
                Tensor::cat(&[c, u, u], 0)?,
                Tensor::cat(&[image_latents, image_latents, &zeros], 0)?,
            )
        } else {
            (text.cond.clone(), image_latents.clone())
        };
        let init = noise.randn(&[1, lc, h, w], dev)?.to_dtype(DType::F32)?;
        let mut latents = (init * scheduler.init_noise_sigma())?;
        let timesteps = scheduler.timesteps().to_vec();
        let total = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate() {
            let copies = if guided { 3 } else { 1 };
            let model_in = Tensor::cat(&vec![&latents; copies], 0)?;
            let scaled = scheduler.scale_model_input(&model_in, i)?;
            let eps = self.predict_noise(&scaled, &img_lat, t, &context)?;
            let eps = if guided { guidance.apply(&eps)? } else { eps };
            latents = scheduler.step(&eps, i, &latents, noise)?;
            let info = StepInfo {
                step: i + 1,
                total,
                timestep: t,
                latents: &latents,
            };
            if progress.on_step(&info) == Control::Stop {
                return Err(Error::Cancelled);
            }
        }
        Ok(latents)
    }

    /// One UNet call on the scaled latents beside the image latents, cast to the UNet's dtype
    /// and back to f32.
    fn predict_noise(
        &self,
        scaled: &Tensor,
        image_latents: &Tensor,
        t: f64,
        context: &Tensor,
    ) -> Result<Tensor> {
        let unet_in = Tensor::cat(&[scaled, image_latents], 1)?.to_dtype(self.c.dtype)?;
        let t = Tensor::new(t as f32, &self.c.device)?;
        Ok(self
            .c
            .unet
            .forward(&unet_in, &t, context)?
            .to_dtype(DType::F32)?)
    }

    /// The prompt's and the negative prompt's encodings, and how many of the prompt's tokens
    /// were truncated.
    pub fn encode_text(&self, prompt: &str, negative_prompt: &str) -> Result<(TextCond, usize)> {
        let (cond, truncated) = self.encode_prompt(prompt)?;
        let (uncond, _) = self.encode_prompt(negative_prompt)?;
        Ok((TextCond { cond, uncond }, truncated))
    }

    /// The whole pipeline on an image tensor `[1, 3, H, W]` in `[-1, 1]` (H, W multiples of 8):
    /// returns `[H, W, 3]` in `[0, 1]`, exactly what diffusers returns as `output_type="np"`.
    pub fn edit_tensor(
        &self,
        image: &Tensor,
        prompt: &str,
        negative_prompt: &str,
        guidance: Guidance,
        run: Sampling<'_>,
    ) -> Result<Tensor> {
        let (text, _) = self.encode_text(prompt, negative_prompt)?;
        let image_latents = self.encode_image(image)?;
        let latents = self.denoise(&image_latents, &text, guidance, run)?;
        img::to_unit_hwc(&self.decode(&latents)?)
    }

    /// Edits a decoded image as the paper does, with seeded noise.
    pub fn edit(
        &self,
        input: &InputImage,
        params: &EditParams,
        progress: &mut dyn Progress,
    ) -> Result<EditOutput> {
        params.validate()?;
        let (kind, mut scheduler) = self.scheduler(params.scheduler, params.steps)?;
        let (w0, h0) = (input.width(), input.height());
        let (tw, th) = img::target_size(w0, h0, params.resolution, params.resize)?;
        if params.instruction.trim().is_empty() {
            // Nothing to do: the input, unchanged.
            return Ok(EditOutput {
                image: input.restore_alpha(input.rgb.clone()),
                seed: params.seed,
                working_size: (tw, th),
                truncated_tokens: 0,
                scheduler: kind,
                timings: Timings::default(),
            });
        }
        let t0 = Instant::now();
        let work = img::fit(&input.rgb, tw, th, params.resize);
        let x = img::to_tensor(&work, &self.c.device)?;
        let (text, truncated_tokens) =
            self.encode_text(&params.instruction, &params.negative_prompt)?;
        let image_latents = self.encode_image(&x)?;
        let t1 = Instant::now();
        let mut noise = SeededNoise::new(params.seed);
        let run = Sampling {
            scheduler: scheduler.as_mut(),
            noise: &mut noise,
            progress,
        };
        let latents = self.denoise(&image_latents, &text, params.guidance(), run)?;
        let t2 = Instant::now();
        let out = img::unit_hwc_to_rgb(&img::to_unit_hwc(&self.decode(&latents)?)?)?;
        let out = if params.keep_working_size || (tw, th) == (w0, h0) {
            out
        } else {
            image::imageops::resize(&out, w0, h0, image::imageops::FilterType::Lanczos3)
        };
        let t3 = Instant::now();
        Ok(EditOutput {
            image: input.restore_alpha(out),
            seed: params.seed,
            working_size: (tw, th),
            truncated_tokens,
            scheduler: kind,
            timings: Timings {
                encode: t1 - t0,
                denoise: t2 - t1,
                decode: t3 - t2,
            },
        })
    }
}

pub(crate) fn encode_prompt(c: &Components, text: &str) -> Result<(Tensor, usize)> {
    let tok = c.tokenizer.encode(text)?;
    let n = tok.ids.len();
    let ids = Tensor::from_vec(tok.ids, (1, n), &c.device)?;
    let hidden = c.text_encoder.forward(&ids)?;
    Ok((hidden.to_dtype(c.dtype)?, tok.truncated_tokens))
}

pub(crate) fn decode(c: &Components, latents: &Tensor) -> Result<Tensor> {
    let sf = c.vae.config().scaling_factor as f32;
    let z = div_s(&latents.to_dtype(DType::F32)?, sf)?.to_dtype(c.dtype)?;
    Ok(c.vae.decode(&z)?.to_dtype(DType::F32)?)
}
