//! The noise schedule shared by every sampler, computed as PyTorch/NumPy compute it.

use super::{SchedulerConfig, Spacing};
use crate::{Error, Result};

/// `torch.linspace(start, end, n, dtype=float32)` (CPU kernel: the first half counts up from
/// `start`, the second half down from `end`).
fn torch_linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (n - i - 1) as f32
            }
        })
        .collect()
}

/// `np.linspace(start, end, n)` in f64 (the last value is exactly `end`).
pub(crate) fn np_linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    v[n - 1] = end;
    v
}

/// `np.interp(x, arange(len(fp)), fp)`.
pub(crate) fn np_interp_index(x: f64, fp: &[f64]) -> f64 {
    let n = fp.len();
    if x <= 0.0 {
        return fp[0];
    }
    if x >= (n - 1) as f64 {
        return fp[n - 1];
    }
    let j = x.floor() as usize;
    if x == j as f64 {
        return fp[j];
    }
    let slope = (fp[j + 1] - fp[j]) / 1.0;
    slope * (x - j as f64) + fp[j]
}

/// Round half to even, as NumPy's `round`.
pub(crate) fn np_round(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 {
        2.0 * (x / 2.0).round()
    } else {
        r
    }
}

/// The training noise schedule: `alphas_cumprod` as f32, exactly as diffusers builds it.
pub fn alphas_cumprod(
    c: &SchedulerConfig,
    default_schedule: &str,
    default_start: f64,
    default_end: f64,
) -> Result<Vec<f32>> {
    let n = c.num_train_timesteps.unwrap_or(1000);
    if n < 2 {
        return Err(Error::Scheduler(
            "num_train_timesteps must be at least 2".into(),
        ));
    }
    let betas: Vec<f32> = if let Some(tb) = &c.trained_betas {
        tb.iter().map(|&b| b as f32).collect()
    } else {
        let start = c.beta_start.unwrap_or(default_start);
        let end = c.beta_end.unwrap_or(default_end);
        match c.beta_schedule.as_deref().unwrap_or(default_schedule) {
            "linear" => torch_linspace_f32(start as f32, end as f32, n),
            "scaled_linear" => torch_linspace_f32(start.sqrt() as f32, end.sqrt() as f32, n)
                .into_iter()
                .map(|b| b * b)
                .collect(),
            "squaredcos_cap_v2" => {
                let ab = |t: f64| {
                    ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                        .cos()
                        .powi(2)
                };
                (0..n)
                    .map(|i| {
                        let t1 = i as f64 / n as f64;
                        let t2 = (i + 1) as f64 / n as f64;
                        (1.0 - ab(t2) / ab(t1)).min(0.999) as f32
                    })
                    .collect()
            }
            o => return Err(Error::Scheduler(format!("unsupported beta_schedule `{o}`"))),
        }
    };
    let mut acc = 1f64;
    Ok(betas
        .iter()
        .map(|&b| {
            acc *= (1.0f32 - b) as f64;
            acc as f32
        })
        .collect())
}

/// `((1 - ᾱ) / ᾱ) ** 0.5` per training timestep, in f32.
pub(crate) fn train_sigmas(ac: &[f32]) -> Vec<f32> {
    ac.iter().map(|&a| ((1.0f32 - a) / a).sqrt()).collect()
}

/// Precomputed schedule for a sampler in sigma space (the Euler family).
#[derive(Debug, Clone)]
pub struct Schedule {
    /// One per step, the value the UNet sees.
    pub timesteps: Vec<f64>,
    /// One per step plus the final one, f32.
    pub sigmas: Vec<f32>,
}

/// Timesteps of the Euler family as f32 values (diffusers' `set_timesteps`).
pub(crate) fn euler_timesteps(
    spacing: Spacing,
    n_train: usize,
    steps: usize,
    offset: usize,
) -> Vec<f32> {
    match spacing {
        Spacing::Linspace => {
            let mut v: Vec<f32> = np_linspace(0.0, (n_train - 1) as f64, steps)
                .into_iter()
                .map(|x| x as f32)
                .collect();
            v.reverse();
            v
        }
        Spacing::Leading => {
            let ratio = n_train / steps;
            (0..steps)
                .rev()
                .map(|i| (np_round((i * ratio) as f64) as f32) + offset as f32)
                .collect()
        }
        Spacing::Trailing => {
            let ratio = n_train as f64 / steps as f64;
            np_arange_desc(n_train as f64, 0.0, ratio)
                .into_iter()
                .map(|x| np_round(x) as f32 - 1.0)
                .collect()
        }
    }
}

/// `np.arange(start, stop, -step)` for `start > stop`.
pub(crate) fn np_arange_desc(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((start - stop) / step).ceil().max(0.0) as usize;
    (0..len).map(|i| start + i as f64 * -step).collect()
}

/// diffusers' `_sigma_to_t`: fractional timestep of a sigma by log-linear interpolation.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // low_idx = number of log_sigmas <= log_sigma, minus one (cumsum(dists >= 0).argmax), clipped.
    let count = log_sigmas
        .iter()
        .filter(|&&ls| log_sigma - ls >= 0.0)
        .count();
    let low = if count == 0 {
        0
    } else {
        (count - 1).min(n - 2)
    };
    // argmax of cumsum returns the first index reaching the max; with an increasing table this
    // is the last index where the condition holds.
    let high = low + 1;
    let (l, h) = (log_sigmas[low], log_sigmas[high]);
    let w = ((l - log_sigma) / (l - h)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * high as f64
}

/// Karras et al. (2022) sigmas with ρ = 7.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    let rho = 7.0;
    let ramp = np_linspace(0.0, 1.0, steps);
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    ramp.iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_matches_numpy() {
        assert_eq!(np_round(0.5), 0.0);
        assert_eq!(np_round(1.5), 2.0);
        assert_eq!(np_round(2.5), 2.0);
        assert_eq!(np_round(2.6), 3.0);
    }

    #[test]
    fn spacings_match_diffusers() {
        assert_eq!(
            euler_timesteps(Spacing::Leading, 1000, 5, 1),
            vec![801.0, 601.0, 401.0, 201.0, 1.0]
        );
        assert_eq!(
            euler_timesteps(Spacing::Trailing, 1000, 4, 0),
            vec![999.0, 749.0, 499.0, 249.0]
        );
        let l = euler_timesteps(Spacing::Linspace, 1000, 3, 0);
        assert_eq!(l, vec![999.0, 499.5, 0.0]);
    }

    #[test]
    fn sd_schedule_endpoints() -> Result<()> {
        let c = SchedulerConfig {
            beta_schedule: Some("scaled_linear".into()),
            beta_start: Some(0.00085),
            beta_end: Some(0.012),
            ..Default::default()
        };
        let ac = alphas_cumprod(&c, "linear", 0.0001, 0.02)?;
        let s = train_sigmas(&ac);
        assert!((s[999] - 14.6146).abs() < 1e-3, "{}", s[999]);
        assert!((s[0] - 0.0292).abs() < 1e-3, "{}", s[0]);
        Ok(())
    }
}
