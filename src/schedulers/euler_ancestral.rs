//! `EulerAncestralDiscreteScheduler`: the InstructPix2Pix default.

use candle_core::Tensor;

use super::schedule::{alphas_cumprod, euler_timesteps, np_interp_index, train_sigmas, Schedule};
use super::{div_s, mul_s, NoiseSource, Scheduler, SchedulerConfig, Spacing};
use crate::Result;

/// Builds the Euler-family schedule (timesteps and sigmas) from a config.
pub(crate) fn euler_schedule(c: &SchedulerConfig, steps: usize) -> Result<(Schedule, Spacing)> {
    let ac = alphas_cumprod(c, "linear", 0.0001, 0.02)?;
    let n_train = ac.len();
    let spacing = Spacing::parse(c.timestep_spacing.as_deref(), Spacing::Linspace)?;
    let ts = euler_timesteps(spacing, n_train, steps, c.steps_offset.unwrap_or(0));
    let table: Vec<f64> = train_sigmas(&ac).into_iter().map(f64::from).collect();
    let mut sigmas: Vec<f32> = ts
        .iter()
        .map(|&t| np_interp_index(t as f64, &table) as f32)
        .collect();
    sigmas.push(0.0);
    Ok((
        Schedule {
            timesteps: ts.into_iter().map(f64::from).collect(),
            sigmas,
        },
        spacing,
    ))
}

pub(crate) fn init_sigma(sigmas: &[f32], spacing: Spacing) -> f64 {
    let max = sigmas.iter().copied().fold(f32::MIN, f32::max);
    match spacing {
        Spacing::Linspace | Spacing::Trailing => max as f64,
        Spacing::Leading => (max * max + 1.0).sqrt() as f64,
    }
}

/// Euler ancestral sampling.
#[derive(Debug, Clone)]
pub struct EulerAncestral {
    schedule: Schedule,
    spacing: Spacing,
}

impl EulerAncestral {
    pub fn new(c: &SchedulerConfig, steps: usize) -> Result<Self> {
        let (schedule, spacing) = euler_schedule(c, steps)?;
        Ok(Self { schedule, spacing })
    }

    pub fn sigmas(&self) -> &[f32] {
        &self.schedule.sigmas
    }
}

impl Scheduler for EulerAncestral {
    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        init_sigma(&self.schedule.sigmas, self.spacing)
    }

    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        let s = self.schedule.sigmas[i];
        div_s(sample, (s * s + 1.0).sqrt())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let sigma = self.schedule.sigmas[i];
        let sigma_to = self.schedule.sigmas[i + 1];
        let pred_original = (sample - mul_s(model_output, sigma)?)?;
        let sigma_up =
            (sigma_to * sigma_to * (sigma * sigma - sigma_to * sigma_to) / (sigma * sigma)).sqrt();
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).sqrt();
        let derivative = div_s(&(sample - pred_original)?, sigma)?;
        let dt = sigma_down - sigma;
        let prev = (sample + mul_s(&derivative, dt)?)?;
        let n = noise.randn(model_output.dims(), model_output.device())?;
        let n = n.to_dtype(prev.dtype())?;
        Ok((prev + mul_s(&n, sigma_up)?)?)
    }
}
