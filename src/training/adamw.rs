//! AdamW as `torch.optim.AdamW` computes it (decoupled weight decay, bias-corrected moments),
//! with its state open for checkpoints: `--resume` continues bit for bit.

use std::collections::HashMap;

use candle_core::{Tensor, Var};

use crate::Result;

/// Hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

/// The optimizer over named variables.
#[derive(Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    vars: Vec<(String, Var)>,
    m: HashMap<String, Tensor>,
    v: HashMap<String, Tensor>,
    /// Updates done.
    pub t: u64,
}

impl AdamW {
    /// `vars` in a fixed order (sorted by name by the caller for reproducibility).
    pub fn new(vars: Vec<(String, Var)>, config: AdamWConfig) -> Self {
        Self {
            config,
            vars,
            m: HashMap::new(),
            v: HashMap::new(),
            t: 0,
        }
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// One update with the gradients `grads` (by name; a variable without one is left alone).
    pub fn step(&mut self, grads: &HashMap<String, Tensor>) -> Result<()> {
        self.t += 1;
        let c = self.config;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (name, var) in &self.vars {
            let Some(g) = grads.get(name) else { continue };
            let g = &g.detach();
            let m = match self.m.get(name) {
                Some(m) => ((m * c.beta1)? + (g * (1.0 - c.beta1))?)?,
                None => (g * (1.0 - c.beta1))?,
            };
            let v = match self.v.get(name) {
                Some(v) => ((v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?,
                None => (g.sqr()? * (1.0 - c.beta2))?,
            };
            let p = &var.as_tensor().detach();
            let decayed = (p * (1.0 - c.lr * c.weight_decay))?;
            // torch: denom = sqrt(v) / sqrt(bc2) + eps; p -= (lr / bc1) · m / denom.
            let denom = ((v.sqrt()? / bc2.sqrt())? + c.eps)?;
            let update = ((&m / denom)? * (c.lr / bc1))?;
            var.set(&(decayed - update)?)?;
            self.m.insert(name.clone(), m);
            self.v.insert(name.clone(), v);
        }
        Ok(())
    }

    /// The moments, as `m.<name>` / `v.<name>` tensors (for a checkpoint).
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (k, t) in &self.m {
            out.insert(format!("m.{k}"), t.clone());
        }
        for (k, t) in &self.v {
            out.insert(format!("v.{k}"), t.clone());
        }
        out
    }

    /// Restores what [`Self::state`] saved, after `t` updates.
    pub fn load_state(&mut self, state: HashMap<String, Tensor>, t: u64) {
        self.m.clear();
        self.v.clear();
        for (k, v) in state {
            if let Some(n) = k.strip_prefix("m.") {
                self.m.insert(n.to_owned(), v);
            } else if let Some(n) = k.strip_prefix("v.") {
                self.v.insert(n.to_owned(), v);
            }
        }
        self.t = t;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_torch_adamw_on_a_scalar() -> Result<()> {
        // torch.optim.AdamW([p], lr=0.1, weight_decay=0.01), p = 1.0, grads 0.5, -0.25, 1.0:
        // reference values computed by hand from torch's update rule.
        let v = Var::from_tensor(&Tensor::new(&[1f32], &Device::Cpu)?)?;
        let mut opt = AdamW::new(
            vec![("p".into(), v.clone())],
            AdamWConfig {
                lr: 0.1,
                ..Default::default()
            },
        );
        let mut p = 1f64;
        let (mut m, mut s) = (0f64, 0f64);
        for (t, g) in [0.5f64, -0.25, 1.0].into_iter().enumerate() {
            let t = t as i32 + 1;
            p *= 1.0 - 0.1 * 0.01;
            m = 0.9 * m + 0.1 * g;
            s = 0.999 * s + 0.001 * g * g;
            let denom = s.sqrt() / (1.0 - 0.999f64.powi(t)).sqrt() + 1e-8;
            p -= 0.1 / (1.0 - 0.9f64.powi(t)) * m / denom;
            let grads = HashMap::from([("p".to_owned(), Tensor::new(&[g as f32], &Device::Cpu)?)]);
            opt.step(&grads)?;
            let got = v.as_tensor().to_vec1::<f32>()?[0] as f64;
            assert!((got - p).abs() < 1e-6, "step {t}: {got} vs {p}");
        }
        Ok(())
    }
}
