//! Plain Stable Diffusion text-to-image (diffusers' `StableDiffusionPipeline`), used by dataset
//! generation. Several prompts can share one seed: the same starting latents and the same
//! per-step noise for every image of the batch.

use candle_core::{DType, Tensor};

use super::edit::{decode, encode_prompt};
use super::guidance::cfg;
use super::image as img;
use super::{Control, Progress, StepInfo};
use crate::loader::Components;
use crate::models::unet::Cond;
use crate::schedulers::{NoiseSource, Scheduler, SchedulerKind};
use crate::{Error, Result};

/// Parameters of a text-to-image render.
#[derive(Debug, Clone, PartialEq)]
pub struct Txt2ImgParams {
    pub width: u32,
    pub height: u32,
    pub steps: usize,
    pub guidance_scale: f64,
    pub negative_prompt: String,
    pub scheduler: Option<SchedulerKind>,
    /// Prompt-to-Prompt threshold `p` in `[0, 1]`: at step `i` of `N`, while
    /// `p > i / (N − 1)`, every image's self-attention uses the logits of the first prompt's
    /// image (InstructPix2Pix's data generation). `0` turns it off.
    pub p2p_threshold: f64,
}

impl Default for Txt2ImgParams {
    fn default() -> Self {
        Self {
            width: 512,
            height: 512,
            steps: 50,
            guidance_scale: 7.5,
            negative_prompt: String::new(),
            scheduler: None,
            p2p_threshold: 0.0,
        }
    }
}

/// A wrapper that hands the same draw to every image of a batch.
struct Shared<'a> {
    inner: &'a mut dyn NoiseSource,
    batch: usize,
}

impl NoiseSource for Shared<'_> {
    fn randn(&mut self, shape: &[usize], device: &candle_core::Device) -> Result<Tensor> {
        let mut one = shape.to_vec();
        one[0] = 1;
        let n = self.inner.randn(&one, device)?;
        Ok(n.repeat((self.batch, 1, 1, 1))?)
    }
}

/// Text-to-image around loaded components.
#[derive(Debug, Clone)]
pub struct Txt2ImgPipeline {
    c: Components,
}

impl Txt2ImgPipeline {
    pub fn new(c: Components) -> Result<Self> {
        let latent = c.vae.config().latent_channels;
        if c.unet.config().in_channels != latent {
            return Err(Error::IncompatibleModel(format!(
                "text-to-image needs a UNet with {latent} input channels, this one has {}",
                c.unet.config().in_channels
            )));
        }
        Ok(Self { c })
    }

    pub fn components(&self) -> &Components {
        &self.c
    }

    pub fn scheduler(
        &self,
        kind: Option<SchedulerKind>,
        steps: usize,
    ) -> Result<Box<dyn Scheduler>> {
        Ok(super::scheduler_for(&self.c, kind, steps)?.1)
    }

    /// Checks the prompts, the Prompt-to-Prompt threshold and the size.
    fn check(&self, prompts: &[&str], p: &Txt2ImgParams) -> Result<()> {
        if prompts.is_empty() {
            return Err(Error::invalid("prompts", "at least one prompt is needed"));
        }
        if !(0.0..=1.0).contains(&p.p2p_threshold) {
            return Err(Error::invalid(
                "p2p_threshold",
                format!("must be within [0, 1], got {}", p.p2p_threshold),
            ));
        }
        let sf = self.c.vae.scale_factor() as u32;
        if !p.width.is_multiple_of(sf)
            || !p.height.is_multiple_of(sf)
            || p.width == 0
            || p.height == 0
        {
            return Err(Error::invalid(
                "size",
                format!("width and height must be positive multiples of {sf}"),
            ));
        }
        Ok(())
    }

    /// The UNet's text context: `[uncond × B, cond × B]` when guided, else `[cond × B]`.
    fn context(&self, prompts: &[&str], negative: &str, guided: bool) -> Result<Tensor> {
        let conds = prompts
            .iter()
            .map(|pr| Ok(encode_prompt(&self.c, pr)?.0))
            .collect::<Result<Vec<_>>>()?;
        let cond = Tensor::cat(&conds, 0)?;
        if !guided {
            return Ok(cond);
        }
        let (uncond, _) = encode_prompt(&self.c, negative)?;
        Ok(Tensor::cat(
            &[&uncond.repeat((prompts.len(), 1, 1))?, &cond],
            0,
        )?)
    }

    /// Renders every prompt from one shared draw of `noise`: returns `[B, H, W, 3]` in `[0, 1]`.
    pub fn render_shared(
        &self,
        prompts: &[&str],
        p: &Txt2ImgParams,
        scheduler: &mut dyn Scheduler,
        noise: &mut dyn NoiseSource,
        progress: &mut dyn Progress,
    ) -> Result<Vec<Tensor>> {
        self.check(prompts, p)?;
        let b = prompts.len();
        let dev = &self.c.device;
        let sf = self.c.vae.scale_factor() as u32;
        let guided = p.guidance_scale > 1.0;
        let context = self.context(prompts, &p.negative_prompt, guided)?;
        let lc = self.c.vae.config().latent_channels;
        let (h, w) = ((p.height / sf) as usize, (p.width / sf) as usize);
        let mut shared = Shared {
            inner: noise,
            batch: b,
        };
        // Latents and the scheduler's arithmetic in f32; cast at the UNet (see the edit pipeline).
        let init = shared.randn(&[b, lc, h, w], dev)?.to_dtype(DType::F32)?;
        let mut latents = (init * scheduler.init_noise_sigma())?;
        let timesteps = scheduler.timesteps().to_vec();
        let total = timesteps.len();
        // Prompt-to-Prompt: the batch is [uncond × b, cond × b] (or [cond × b]); every item
        // takes the self-attention logits of the first item of its half.
        let groups = if guided { 2 } else { 1 };
        let from: Vec<u32> = (0..groups * b).map(|j| ((j / b) * b) as u32).collect();
        let from = Tensor::new(from.as_slice(), dev)?;
        for (i, &t) in timesteps.iter().enumerate() {
            let model_in = if guided {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let scaled = scheduler
                .scale_model_input(&model_in, i)?
                .to_dtype(self.c.dtype)?;
            let t_tensor = Tensor::new(t as f32, dev)?;
            let mut cond = Cond::text(&context);
            if p2p_active(p.p2p_threshold, i, total) && b > 1 {
                cond.self_attn.logits_from = Some(&from);
            }
            let eps = self
                .c
                .unet
                .forward_cond(&scaled, &t_tensor, cond)?
                .to_dtype(DType::F32)?;
            let eps = if guided {
                cfg(
                    &eps.narrow(0, b, b)?,
                    &eps.narrow(0, 0, b)?,
                    p.guidance_scale,
                )?
            } else {
                eps
            };
            latents = scheduler.step(&eps, i, &latents, &mut shared)?;
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
        let decoded = decode(&self.c, &latents)?;
        (0..b)
            .map(|k| img::to_unit_hwc(&decoded.narrow(0, k, 1)?))
            .collect()
    }
}

/// Whether Prompt-to-Prompt attention replacement is on at step `i` of `total`: while
/// `p > i / (total − 1)` (the InstructPix2Pix data-generation schedule).
pub fn p2p_active(p: f64, i: usize, total: usize) -> bool {
    let frac = if total > 1 {
        i as f64 / (total - 1) as f64
    } else {
        0.0
    };
    p > frac
}

#[cfg(test)]
mod tests {
    use super::p2p_active;

    #[test]
    fn p2p_schedule_follows_the_threshold() {
        // 11 steps: fractions 0, 0.1, ..., 1.
        let on = |p: f64| (0..11).filter(|&i| p2p_active(p, i, 11)).count();
        assert_eq!(on(0.0), 0);
        assert_eq!(on(0.05), 1);
        assert_eq!(on(0.55), 6);
        assert_eq!(on(1.0), 10);
        assert!(p2p_active(0.5, 0, 1));
        assert!(!p2p_active(0.0, 0, 1));
    }
}
