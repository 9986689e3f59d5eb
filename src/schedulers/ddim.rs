//! `DDIMScheduler` with η = 0 (deterministic).

use candle_core::Tensor;

use super::schedule::{alphas_cumprod, np_arange_desc, np_linspace, np_round};
use super::{div_s, mul_s, NoiseSource, Scheduler, SchedulerConfig, Spacing};
use crate::{Error, Result};

/// DDIM sampling.
#[derive(Debug, Clone)]
pub struct Ddim {
    timesteps: Vec<f64>,
    ac: Vec<f32>,
    final_ac: f32,
    step_ratio: usize,
    clip: Option<f32>,
}

impl Ddim {
    pub fn new(c: &SchedulerConfig, steps: usize) -> Result<Self> {
        let ac = alphas_cumprod(c, "linear", 0.0001, 0.02)?;
        let n = ac.len();
        if steps > n {
            return Err(Error::invalid(
                "steps",
                format!("DDIM allows at most {n} steps"),
            ));
        }
        let offset = c.steps_offset.unwrap_or(0) as i64;
        let ts: Vec<i64> = match Spacing::parse(c.timestep_spacing.as_deref(), Spacing::Leading)? {
            Spacing::Linspace => np_linspace(0.0, (n - 1) as f64, steps)
                .into_iter()
                .rev()
                .map(|x| np_round(x) as i64)
                .collect(),
            Spacing::Leading => (0..steps)
                .rev()
                .map(|i| (i * (n / steps)) as i64 + offset)
                .collect(),
            Spacing::Trailing => np_arange_desc(n as f64, 0.0, n as f64 / steps as f64)
                .into_iter()
                .map(|x| np_round(x) as i64 - 1)
                .collect(),
        };
        if ts.iter().any(|&t| t < 0 || t as usize >= n) {
            return Err(Error::Scheduler(
                "DDIM timesteps fall outside the training range".into(),
            ));
        }
        let final_ac = if c.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            ac[0]
        };
        let clip = c
            .clip_sample
            .unwrap_or(true)
            .then(|| c.clip_sample_range.unwrap_or(1.0) as f32);
        Ok(Self {
            timesteps: ts.into_iter().map(|t| t as f64).collect(),
            ac,
            final_ac,
            step_ratio: n / steps,
            clip,
        })
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, _i: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let t = self.timesteps[i] as i64;
        let prev_t = t - self.step_ratio as i64;
        let a_t = self.ac[t as usize];
        let a_prev = if prev_t >= 0 {
            self.ac[prev_t as usize]
        } else {
            self.final_ac
        };
        let b_t = 1.0f32 - a_t;
        let mut pred_original = div_s(&(sample - mul_s(model_output, b_t.sqrt())?)?, a_t.sqrt())?;
        if let Some(r) = self.clip {
            pred_original = pred_original.clamp(-r, r)?;
        }
        let direction = mul_s(model_output, (1.0f32 - a_prev).sqrt())?;
        Ok((mul_s(&pred_original, a_prev.sqrt())? + direction)?)
    }
}
