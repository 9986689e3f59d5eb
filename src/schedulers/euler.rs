//! `EulerDiscreteScheduler` (deterministic; `s_churn = 0`), with the Karras-sigmas option.

use candle_core::Tensor;

use super::euler_ancestral::{euler_schedule, init_sigma};
use super::schedule::{alphas_cumprod, karras_sigmas, sigma_to_t, train_sigmas};
use super::{div_s, mul_s, NoiseSource, Scheduler, SchedulerConfig, Spacing};
use crate::{Error, Result};

/// Euler sampling.
#[derive(Debug, Clone)]
pub struct Euler {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    spacing: Spacing,
}

impl Euler {
    pub fn new(c: &SchedulerConfig, steps: usize) -> Result<Self> {
        if let Some(t) = c.interpolation_type.as_deref() {
            if t != "linear" {
                return Err(Error::Scheduler(format!(
                    "interpolation_type `{t}` is not supported"
                )));
            }
        }
        if c.timestep_type.as_deref().is_some_and(|t| t != "discrete") {
            return Err(Error::Scheduler(
                "only discrete timesteps are supported".into(),
            ));
        }
        let (schedule, spacing) = euler_schedule(c, steps)?;
        let mut timesteps = schedule.timesteps;
        let mut sigmas = schedule.sigmas;
        let last = match c.final_sigmas_type.as_deref() {
            None | Some("zero") => 0.0f64,
            Some("sigma_min") => {
                let ac = alphas_cumprod(c, "linear", 0.0001, 0.02)?;
                (((1.0 - ac[0]) / ac[0]) as f64).sqrt()
            }
            Some(o) => return Err(Error::Scheduler(format!("final_sigmas_type `{o}`"))),
        };
        if c.use_karras_sigmas.unwrap_or(false) {
            let ac = alphas_cumprod(c, "linear", 0.0001, 0.02)?;
            let log_sigmas: Vec<f64> = train_sigmas(&ac).iter().map(|&s| (s as f64).ln()).collect();
            let body: Vec<f64> = sigmas[..steps].iter().map(|&s| s as f64).collect();
            let smin = c.sigma_min.unwrap_or(body[steps - 1]);
            let smax = c.sigma_max.unwrap_or(body[0]);
            let ks = karras_sigmas(smin, smax, steps);
            timesteps = ks
                .iter()
                .map(|&s| (sigma_to_t(s, &log_sigmas) as f32) as f64)
                .collect();
            sigmas = ks.iter().map(|&s| s as f32).collect();
            sigmas.push(last as f32);
        } else {
            sigmas[steps] = last as f32;
        }
        Ok(Self {
            timesteps,
            sigmas,
            spacing,
        })
    }
}

impl Scheduler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        init_sigma(&self.sigmas, self.spacing)
    }

    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        let s = self.sigmas[i];
        div_s(sample, (s * s + 1.0).sqrt())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let sigma_hat = self.sigmas[i];
        let pred_original = (sample - mul_s(model_output, sigma_hat)?)?;
        let derivative = div_s(&(sample - pred_original)?, sigma_hat)?;
        let dt = self.sigmas[i + 1] - sigma_hat;
        Ok((sample + mul_s(&derivative, dt)?)?)
    }
}
