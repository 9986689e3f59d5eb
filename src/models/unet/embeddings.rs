//! Sinusoidal timestep embedding and the MLP that follows it.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::models::nn::Linear;

/// diffusers' `get_timestep_embedding`, computed in f32 with the reference's order of operations
/// (`exp(-ln(10000)·i / (half − shift))`, then `t · freq`, then `[cos, sin]` when flipped).
pub fn timestep_embedding(
    timesteps: &[f32],
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let log_period = -(10000f64.ln()) as f32;
    let denom = (half as f64 - freq_shift) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((log_period * i as f32) / denom).exp())
        .collect();
    let mut out = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let args: Vec<f32> = freqs.iter().map(|f| t * f).collect();
        let (first, second): (Vec<f32>, Vec<f32>) = if flip_sin_to_cos {
            (
                args.iter().map(|a| a.cos()).collect(),
                args.iter().map(|a| a.sin()).collect(),
            )
        } else {
            (
                args.iter().map(|a| a.sin()).collect(),
                args.iter().map(|a| a.cos()).collect(),
            )
        };
        out.extend(first);
        out.extend(second);
        if dim % 2 == 1 {
            out.push(0.0);
        }
    }
    Tensor::from_vec(out, (timesteps.len(), dim), device)
}

/// `TimestepEmbedding`: linear → SiLU → linear.
#[derive(Debug, Clone)]
pub struct TimestepMlp {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepMlp {
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::new(vb.pp("linear_1"), in_dim, out_dim, true)?,
            linear_2: Linear::new(vb.pp("linear_2"), out_dim, out_dim, true)?,
        })
    }
}

impl Module for TimestepMlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = candle_nn::ops::silu(&self.linear_1.forward(x)?)?;
        self.linear_2.forward(&h)
    }
}

/// Reads timesteps (a scalar or `[B]`) to host f32 values.
pub fn timesteps_to_vec(t: &Tensor) -> Result<Vec<f32>> {
    let t = t.to_dtype(DType::F32)?;
    match t.rank() {
        0 => Ok(vec![t.to_scalar::<f32>()?]),
        _ => t.flatten_all()?.to_vec1::<f32>(),
    }
}
