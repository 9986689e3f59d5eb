//! Exponential moving average of the weights, as diffusers' `EMAModel` with warm-up off:
//! `decay_t = min(decay, (1 + t) / (10 + t))`, `ema ← ema − (1 − decay_t)(ema − θ)`.

use std::collections::HashMap;

use candle_core::{Tensor, Var};

use crate::Result;

#[derive(Debug)]
pub struct Ema {
    pub decay: f64,
    pub shadow: HashMap<String, Tensor>,
}

impl Ema {
    /// Starts from the current weights.
    pub fn new(vars: &[(String, Var)], decay: f64) -> Result<Self> {
        let shadow = vars
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().detach().copy()?)))
            .collect::<Result<_>>()?;
        Ok(Self { decay, shadow })
    }

    /// The decay used at optimisation step `step` (counted from 0 before the first update).
    pub fn decay_at(&self, step: u64) -> f64 {
        let t = step as f64;
        self.decay.min((1.0 + t) / (10.0 + t))
    }

    /// Moves the average towards the weights after update number `step` (1-based).
    pub fn update(&mut self, vars: &[(String, Var)], step: u64) -> Result<()> {
        // diffusers increments its counter before computing the decay: step 1 uses t = 0.
        let d = self.decay_at(step.saturating_sub(1));
        for (k, v) in vars {
            if let Some(e) = self.shadow.get_mut(k) {
                // Detached: the average must not keep a graph back through every step.
                let w = v.as_tensor().detach();
                let next = (&*e - ((&*e - w)? * (1.0 - d))?)?;
                *e = next;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn warm_up_then_the_configured_decay() -> Result<()> {
        let v = Var::from_tensor(&Tensor::new(&[0f32], &Device::Cpu)?)?;
        let vars = vec![("w".to_owned(), v.clone())];
        let mut e = Ema::new(&vars, 0.9999)?;
        assert!((e.decay_at(0) - 0.1).abs() < 1e-12);
        assert!((e.decay_at(90) - 91.0 / 100.0).abs() < 1e-12);
        assert_eq!(e.decay_at(10_000_000), 0.9999);
        v.set(&Tensor::new(&[1f32], &Device::Cpu)?)?;
        e.update(&vars, 1)?;
        // decay 0.1: ema = 0 − 0.9 · (0 − 1) = 0.9.
        let got = e.shadow["w"].to_vec1::<f32>()?[0];
        // No graph is kept from step to step.
        assert!(!e.shadow["w"].track_op());
        assert!((got - 0.9).abs() < 1e-6, "{got}");
        Ok(())
    }
}
