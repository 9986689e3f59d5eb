//! `DPMSolverMultistepScheduler` as DPM-Solver++ 2M (`algorithm_type = "dpmsolver++"`,
//! `solver_order = 2`, midpoint or Heun), with the Karras-sigmas option.

use candle_core::Tensor;

use super::schedule::{
    alphas_cumprod, karras_sigmas, np_arange_desc, np_interp_index, np_linspace, np_round,
    sigma_to_t, train_sigmas,
};
use super::{mul_s, NoiseSource, Scheduler, SchedulerConfig, Spacing};
use crate::{Error, Result};

/// DPM-Solver++ 2M.
#[derive(Debug, Clone)]
pub struct DpmPp2m {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    order: usize,
    heun: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    final_zero: bool,
    previous: Option<Tensor>,
    lower_order_nums: usize,
}

fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha_t = 1.0f32 / (sigma * sigma + 1.0).sqrt();
    (alpha_t, sigma * alpha_t)
}

impl DpmPp2m {
    pub fn new(c: &SchedulerConfig, steps: usize, force_karras: bool) -> Result<Self> {
        let (order, heun) = solver(c)?;
        let ac = alphas_cumprod(c, "linear", 0.0001, 0.02)?;
        let n = ac.len();
        let mut ts = spaced_timesteps(c, steps, n)?;
        let table: Vec<f64> = train_sigmas(&ac).into_iter().map(f64::from).collect();
        let log_sigmas: Vec<f64> = table.iter().map(|s| s.ln()).collect();
        let karras = force_karras || c.use_karras_sigmas.unwrap_or(false);
        let body: Vec<f64> = if karras {
            let smin = c.sigma_min.unwrap_or(table[0]);
            let smax = c.sigma_max.unwrap_or(table[n - 1]);
            let ks = karras_sigmas(smin, smax, steps);
            ts = ks
                .iter()
                .map(|&s| np_round(sigma_to_t(s, &log_sigmas)))
                .collect();
            ks
        } else {
            ts.iter().map(|&t| np_interp_index(t, &table)).collect()
        };
        let final_zero = match c.final_sigmas_type.as_deref() {
            None | Some("zero") => true,
            Some("sigma_min") => false,
            Some(o) => return Err(Error::Scheduler(format!("final_sigmas_type `{o}`"))),
        };
        let mut sigmas: Vec<f32> = body.iter().map(|&s| s as f32).collect();
        sigmas.push(if final_zero {
            0.0
        } else {
            ((1.0 - ac[0]) / ac[0]).sqrt()
        });
        Ok(Self {
            timesteps: ts.into_iter().map(|t| t as i64 as f64).collect(),
            sigmas,
            order,
            heun,
            lower_order_final: c.lower_order_final.unwrap_or(true),
            euler_at_final: c.euler_at_final.unwrap_or(false),
            final_zero,
            previous: None,
            lower_order_nums: 0,
        })
    }
}

/// The solver's order and whether it is Heun's, from the config (dpmsolver++ only).
fn solver(c: &SchedulerConfig) -> Result<(usize, bool)> {
    match c.algorithm_type.as_deref() {
        None | Some("dpmsolver++") | Some("deis") => {}
        Some(o) => {
            return Err(Error::Scheduler(format!(
                "algorithm_type `{o}` is not supported (dpmsolver++ only)"
            )))
        }
    }
    let order = c.solver_order.unwrap_or(2);
    if !(1..=2).contains(&order) {
        return Err(Error::Scheduler(format!(
            "solver_order {order} is not supported (1 or 2)"
        )));
    }
    let heun = match c.solver_type.as_deref() {
        None | Some("midpoint") | Some("logrho") | Some("bh1") | Some("bh2") => false,
        Some("heun") => true,
        Some(o) => return Err(Error::Scheduler(format!("solver_type `{o}`"))),
    };
    Ok((order, heun))
}

/// The timesteps of `steps` steps over `n` training steps, spaced as the config says.
fn spaced_timesteps(c: &SchedulerConfig, steps: usize, n: usize) -> Result<Vec<f64>> {
    // lambda_min_clipped defaults to -inf, so the last timestep is the full range.
    let last = n;
    let offset = c.steps_offset.unwrap_or(0) as i64;
    let ts: Vec<f64> = match Spacing::parse(c.timestep_spacing.as_deref(), Spacing::Linspace)? {
        Spacing::Linspace => {
            let mut v: Vec<f64> = np_linspace(0.0, (last - 1) as f64, steps + 1)
                .into_iter()
                .map(np_round)
                .collect();
            v.reverse();
            v.pop();
            v
        }
        Spacing::Leading => {
            let ratio = last / (steps + 1);
            let mut v: Vec<f64> = (0..=steps).rev().map(|i| (i * ratio) as f64).collect();
            v.pop();
            v.into_iter().map(|t| t + offset as f64).collect()
        }
        Spacing::Trailing => np_arange_desc(last as f64, 0.0, n as f64 / steps as f64)
            .into_iter()
            .map(|x| np_round(x) - 1.0)
            .collect(),
    };
    Ok(ts)
}

impl Scheduler for DpmPp2m {
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
        let n = self.timesteps.len();
        let lower_order_final = i == n - 1
            && (self.euler_at_final || (self.lower_order_final && n < 15) || self.final_zero);

        // convert_model_output: x0 prediction.
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let x0 = super::div_s(&(sample - mul_s(model_output, sigma_s0)?)?, alpha_s0)?;

        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let lambda_t = alpha_t.ln() - sigma_t.ln();
        let lambda_s0 = alpha_s0.ln() - sigma_s0.ln();
        let h = lambda_t - lambda_s0;
        let em1 = (-h).exp() - 1.0;

        let first_order = self.order == 1 || self.lower_order_nums < 1 || lower_order_final;
        let prev = match (&self.previous, first_order) {
            (Some(m1), false) => {
                let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
                let lambda_s1 = alpha_s1.ln() - sigma_s1.ln();
                let h0 = lambda_s0 - lambda_s1;
                let r0 = h0 / h;
                let d1 = mul_s(&(&x0 - m1)?, 1.0f32 / r0)?;
                let a = mul_s(sample, sigma_t / sigma_s0)?;
                let b = mul_s(&x0, alpha_t * em1)?;
                if self.heun {
                    let c = mul_s(&d1, alpha_t * (em1 / h + 1.0))?;
                    ((a - b)? + c)?
                } else {
                    let c = mul_s(&d1, 0.5f32 * (alpha_t * em1))?;
                    ((a - b)? - c)?
                }
            }
            _ => {
                let a = mul_s(sample, sigma_t / sigma_s0)?;
                (a - mul_s(&x0, alpha_t * em1)?)?
            }
        };
        if self.lower_order_nums < self.order {
            self.lower_order_nums += 1;
        }
        self.previous = Some(x0);
        Ok(prev)
    }
}
