//! Samplers configured from `scheduler/scheduler_config.json`, reproducing diffusers' float32
//! arithmetic step for step.
//!
//! Scalars (sigmas, alphas) are computed the way PyTorch computes them (f32 betas, cumulative
//! product accumulated in f64 and stored as f32, NumPy's f64 interpolation), and each step applies
//! the same tensor operations in the same order as diffusers, so the latents match the reference
//! within float32 rounding.

pub mod ddim;
pub mod dpmpp_2m;
pub mod euler;
pub mod euler_ancestral;
pub mod noise;
mod schedule;

use candle_core::Tensor;
use serde::Deserialize;

pub use self::noise::{NoiseSource, ReplayNoise, SeededNoise};
pub use self::schedule::{alphas_cumprod, Schedule};
use crate::{Error, Result};

/// A denoising sampler.
pub trait Scheduler: Send {
    /// The timesteps handed to the UNet, one per step, in order.
    fn timesteps(&self) -> &[f64];

    /// The standard deviation the starting latents are scaled by.
    fn init_noise_sigma(&self) -> f64;

    /// Scales the UNet input at step `i` (identity for DDIM and DPM-Solver).
    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor>;

    /// Advances `sample` from step `i` given the (guided) model output. Ancestral samplers draw
    /// their noise from `noise`.
    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor>;
}

/// The samplers this crate implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// Euler ancestral (the InstructPix2Pix default).
    EulerAncestral,
    Euler,
    Ddim,
    /// DPM-Solver++ 2M.
    DpmPp2m,
    /// DPM-Solver++ 2M with Karras sigmas.
    DpmPp2mKarras,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 5] = [
        SchedulerKind::EulerAncestral,
        SchedulerKind::Euler,
        SchedulerKind::Ddim,
        SchedulerKind::DpmPp2m,
        SchedulerKind::DpmPp2mKarras,
    ];

    /// The short name used on the command line and in the API.
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::EulerAncestral => "euler_a",
            SchedulerKind::Euler => "euler",
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::DpmPp2m => "dpmpp_2m",
            SchedulerKind::DpmPp2mKarras => "dpmpp_2m_karras",
        }
    }

    /// The diffusers class a `scheduler_config.json` names.
    pub fn from_class_name(class: &str, karras: bool) -> Option<Self> {
        Some(match class {
            "EulerAncestralDiscreteScheduler" => SchedulerKind::EulerAncestral,
            "EulerDiscreteScheduler" => SchedulerKind::Euler,
            "DDIMScheduler" => SchedulerKind::Ddim,
            "DPMSolverMultistepScheduler" if karras => SchedulerKind::DpmPp2mKarras,
            "DPMSolverMultistepScheduler" => SchedulerKind::DpmPp2m,
            _ => return None,
        })
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for SchedulerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let norm = s.to_ascii_lowercase().replace(['-', ' ', '+'], "_");
        Ok(match norm.as_str() {
            "euler_a" | "euler_ancestral" | "eulerancestraldiscretescheduler" => {
                SchedulerKind::EulerAncestral
            }
            "euler" | "eulerdiscretescheduler" => SchedulerKind::Euler,
            "ddim" | "ddimscheduler" => SchedulerKind::Ddim,
            "dpmpp_2m" | "dpm__2m" | "dpmsolver" | "dpmsolvermultistepscheduler" => {
                SchedulerKind::DpmPp2m
            }
            "dpmpp_2m_karras" | "dpm__2m_karras" => SchedulerKind::DpmPp2mKarras,
            _ => {
                return Err(Error::Scheduler(format!(
                    "unknown scheduler `{s}` (one of: {})",
                    Self::ALL.map(|k| k.name()).join(", ")
                )))
            }
        })
    }
}

/// `scheduler_config.json`. Missing fields take the defaults of the class being built, as
/// diffusers' `from_config` does.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<String>,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: Option<String>,
    pub timestep_spacing: Option<String>,
    pub steps_offset: Option<usize>,
    pub use_karras_sigmas: Option<bool>,
    pub interpolation_type: Option<String>,
    pub set_alpha_to_one: Option<bool>,
    pub clip_sample: Option<bool>,
    pub clip_sample_range: Option<f64>,
    pub thresholding: Option<bool>,
    pub rescale_betas_zero_snr: Option<bool>,
    pub final_sigmas_type: Option<String>,
    pub solver_order: Option<usize>,
    pub algorithm_type: Option<String>,
    pub solver_type: Option<String>,
    pub lower_order_final: Option<bool>,
    pub euler_at_final: Option<bool>,
    pub timestep_type: Option<String>,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub use_lu_lambdas: Option<bool>,
    pub variance_type: Option<String>,
}

impl SchedulerConfig {
    /// The sampler the config's `_class_name` names, if it is one of ours.
    pub fn kind(&self) -> Option<SchedulerKind> {
        let karras = self.use_karras_sigmas.unwrap_or(false);
        self.class_name
            .as_deref()
            .and_then(|c| SchedulerKind::from_class_name(c, karras))
    }
}

/// How timesteps are spaced (diffusers' `timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spacing {
    Linspace,
    Leading,
    Trailing,
}

impl Spacing {
    fn parse(s: Option<&str>, default: Spacing) -> Result<Self> {
        match s {
            None => Ok(default),
            Some("linspace") => Ok(Spacing::Linspace),
            Some("leading") => Ok(Spacing::Leading),
            Some("trailing") => Ok(Spacing::Trailing),
            Some(o) => Err(Error::Scheduler(format!(
                "unsupported timestep_spacing `{o}`"
            ))),
        }
    }
}

pub(crate) fn require_epsilon(c: &SchedulerConfig) -> Result<()> {
    match c.prediction_type.as_deref() {
        None | Some("epsilon") => {}
        Some(o) => {
            return Err(Error::Scheduler(format!(
                "prediction_type `{o}` is not supported (epsilon only)"
            )))
        }
    }
    if c.thresholding.unwrap_or(false) {
        return Err(Error::Scheduler("thresholding is not supported".into()));
    }
    if c.rescale_betas_zero_snr.unwrap_or(false) {
        return Err(Error::Scheduler(
            "rescale_betas_zero_snr is not supported".into(),
        ));
    }
    for (name, v) in [
        ("use_exponential_sigmas", c.use_exponential_sigmas),
        ("use_beta_sigmas", c.use_beta_sigmas),
        ("use_lu_lambdas", c.use_lu_lambdas),
    ] {
        if v.unwrap_or(false) {
            return Err(Error::Scheduler(format!("{name} is not supported")));
        }
    }
    Ok(())
}

/// Builds a sampler of `kind` for `steps` steps from a (possibly other class's) config.
pub fn build(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    steps: usize,
) -> Result<Box<dyn Scheduler>> {
    if steps == 0 {
        return Err(Error::invalid("steps", "must be at least 1"));
    }
    require_epsilon(config)?;
    Ok(match kind {
        SchedulerKind::EulerAncestral => {
            Box::new(euler_ancestral::EulerAncestral::new(config, steps)?)
        }
        SchedulerKind::Euler => Box::new(euler::Euler::new(config, steps)?),
        SchedulerKind::Ddim => Box::new(ddim::Ddim::new(config, steps)?),
        SchedulerKind::DpmPp2m => Box::new(dpmpp_2m::DpmPp2m::new(config, steps, false)?),
        SchedulerKind::DpmPp2mKarras => Box::new(dpmpp_2m::DpmPp2m::new(config, steps, true)?),
    })
}

// --- float32 tensor helpers that mirror PyTorch's `tensor ⊙ 0-dim tensor` semantics ---

pub(crate) fn scalar(v: f32, like: &Tensor) -> Result<Tensor> {
    Ok(Tensor::new(v, like.device())?.to_dtype(like.dtype())?)
}

/// `t * s` with `s` rounded to f32 first, as PyTorch multiplies by a Python float.
pub fn mul_s(t: &Tensor, s: f32) -> Result<Tensor> {
    Ok(t.broadcast_mul(&scalar(s, t)?)?)
}

/// `t / s` as a true division (not a multiplication by the reciprocal), as PyTorch divides
/// by a Python float.
pub fn div_s(t: &Tensor, s: f32) -> Result<Tensor> {
    Ok(t.broadcast_div(&scalar(s, t)?)?)
}
