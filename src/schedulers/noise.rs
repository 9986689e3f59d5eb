//! The one source of every random draw in a generation.
//!
//! Noise is made on the host from a counter-based-free, portable generator (ChaCha20 and the
//! Box–Muller transform) and then moved to the device, so a seed gives the same image on any
//! device and any machine. Recorded noise (e.g. from the Python reference) can be replayed.

use std::collections::VecDeque;

use candle_core::{Device, Tensor};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

use crate::{Error, Result};

/// A deterministic RNG for `(seed, stream, index)`.
pub fn rng_for(seed: u64, stream: &[u8; 8], index: u64) -> ChaCha20Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(stream);
    key[16..24].copy_from_slice(&index.to_le_bytes());
    ChaCha20Rng::from_seed(key)
}

/// Uniform in `[0, 1)`.
pub fn unit(rng: &mut ChaCha20Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// Where standard-normal noise comes from.
pub trait NoiseSource: Send {
    /// A tensor of independent N(0, 1) draws, f32, of the given shape.
    fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor>;
}

/// Seeded Gaussian noise: ChaCha20 → uniform 24-bit floats → Box–Muller.
#[derive(Debug, Clone)]
pub struct SeededNoise {
    rng: ChaCha20Rng,
    spare: Option<f32>,
}

impl SeededNoise {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha20Rng::seed_from_u64(seed),
            spare: None,
        }
    }

    fn uniform_open(&mut self) -> f64 {
        // (0, 1]: never zero, so ln() is finite.
        ((self.rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    /// One standard normal draw.
    pub fn next_gaussian(&mut self) -> f32 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        let u1 = self.uniform_open();
        let u2 = self.uniform_open();
        let r = (-2.0 * u1.ln()).sqrt();
        let th = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some((r * th.sin()) as f32);
        (r * th.cos()) as f32
    }
}

impl NoiseSource for SeededNoise {
    fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.next_gaussian()).collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_device(device)?)
    }
}

/// Replays recorded tensors in order; asking for more than was recorded, or for another shape,
/// is an error.
#[derive(Debug, Default)]
pub struct ReplayNoise {
    queue: VecDeque<Tensor>,
}

impl ReplayNoise {
    pub fn new(tensors: impl IntoIterator<Item = Tensor>) -> Self {
        Self {
            queue: tensors.into_iter().collect(),
        }
    }

    /// How many recorded tensors have not been used.
    pub fn remaining(&self) -> usize {
        self.queue.len()
    }
}

impl NoiseSource for ReplayNoise {
    fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let t = self
            .queue
            .pop_front()
            .ok_or_else(|| Error::Scheduler("replayed noise exhausted".into()))?;
        if t.dims() != shape {
            return Err(Error::Scheduler(format!(
                "replayed noise has shape {:?}, {:?} was asked for",
                t.dims(),
                shape
            )));
        }
        Ok(t.to_dtype(candle_core::DType::F32)?.to_device(device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_noise_is_deterministic_and_standard() {
        let mut a = SeededNoise::new(42);
        let mut b = SeededNoise::new(42);
        let xs: Vec<f32> = (0..20000).map(|_| a.next_gaussian()).collect();
        let ys: Vec<f32> = (0..20000).map(|_| b.next_gaussian()).collect();
        assert_eq!(xs, ys);
        let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.03, "var {var}");
        let mut c = SeededNoise::new(43);
        assert_ne!(c.next_gaussian(), xs[0]);
    }

    #[test]
    fn replay_checks_shape_and_count() -> Result<()> {
        let t = Tensor::zeros((1, 4, 2, 2), candle_core::DType::F32, &Device::Cpu)?;
        let mut r = ReplayNoise::new([t]);
        assert!(r.randn(&[1, 4, 2, 3], &Device::Cpu).is_err());
        let mut r = ReplayNoise::new([Tensor::zeros((2,), candle_core::DType::F32, &Device::Cpu)?]);
        assert!(r.randn(&[2], &Device::Cpu).is_ok());
        assert!(r.randn(&[2], &Device::Cpu).is_err());
        Ok(())
    }
}
