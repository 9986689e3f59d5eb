//! Small building blocks shared by the models: norms, projections, activations, attention.
//!
//! Every model goes through these wrappers, so a faster kernel (or a differentiable form for
//! training) is swapped in at one place.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// A dense layer `y = x Wᵀ + b` that accepts inputs of any rank.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// Loads a projection stored either as a linear weight `[out, in]` or as a 1×1 convolution
    /// weight `[out, in, 1, 1]` (old VAE attention checkpoints).
    pub fn new_maybe_conv(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        let weight = match vb.get((out_dim, in_dim), "weight") {
            Ok(w) => w,
            Err(_) => vb
                .get((out_dim, in_dim, 1, 1), "weight")?
                .reshape((out_dim, in_dim))?,
        };
        let bias = Some(vb.get(out_dim, "bias")?);
        Ok(Self { weight, bias })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let in_dim = dims[dims.len() - 1];
        let rows = x.elem_count() / in_dim;
        let x2 = x.reshape((rows, in_dim))?;
        let y = x2.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims.to_vec();
        let last = out_dims.len() - 1;
        out_dims[last] = self.weight.dim(0)?;
        y.reshape(out_dims)
    }
}

/// Layer normalisation over the last dimension, two-pass (mean, then the centred variance) as
/// PyTorch computes it. Built from differentiable tensor ops.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        xn.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

/// Group normalisation over `[B, C, ...]`, statistics in f32.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if !channels.is_multiple_of(groups) {
            candle_core::bail!(
                "GroupNorm: {channels} channels are not divisible by {groups} groups"
            );
        }
        Ok(Self {
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
            groups,
            eps,
        })
    }

    /// GroupNorm followed by SiLU, the pair every ResNet block uses.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::silu(&self.forward(x)?)
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let dtype = x.dtype();
        let x = x.contiguous()?.reshape((b, self.groups, ()))?;
        let x = x.to_dtype(DType::F32)?;
        let n = x.dim(2)? as f64;
        let mean = (x.sum_keepdim(2)? / n)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = (xc.sqr()?.sum_keepdim(2)? / n)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let mut shape = vec![1, c];
        shape.extend(std::iter::repeat_n(1, dims.len() - 2));
        let xn = xn.to_dtype(dtype)?.reshape(dims)?;
        xn.broadcast_mul(&self.weight.reshape(shape.clone())?)?
            .broadcast_add(&self.bias.reshape(shape)?)
    }
}

/// A 2-D convolution with optional stride and padding.
#[derive(Debug, Clone)]
pub struct Conv2d {
    inner: candle_nn::Conv2d,
}

impl Conv2d {
    pub fn new(
        vb: VarBuilder,
        in_c: usize,
        out_c: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let weight = vb.get((out_c, in_c, kernel, kernel), "weight")?;
        let bias = vb.get(out_c, "bias")?;
        let cfg = candle_nn::Conv2dConfig {
            padding,
            stride,
            dilation: 1,
            groups: 1,
            cudnn_fwd_algo: None,
        };
        Ok(Self {
            inner: candle_nn::Conv2d::new(weight, Some(bias), cfg),
        })
    }

    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.inner.forward(x)
    }
}

/// Exact (erf) GELU, as `torch.nn.functional.gelu` computes by default.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

/// CLIP's quick GELU: `x · σ(1.702 x)`.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    x * candle_nn::ops::sigmoid(&(x * 1.702)?)?
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax_last_dim(x)
}

/// Multi-head scaled dot-product attention.
///
/// `q: [B, Nq, H·d]`, `k, v: [B, Nk, H·d]` → `[B, Nq, H·d]`. `mask`, when given, is added to
/// the logits (broadcast over batch and heads).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, nq, inner) = q.dims3()?;
    let nk = k.dim(1)?;
    let d = inner / heads;
    let scale = 1.0 / (d as f64).sqrt();
    let split = |t: &Tensor, n: usize| -> Result<Tensor> {
        t.reshape((b, n, heads, d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * heads, n, d))
    };
    let q = split(q, nq)?;
    let k = split(k, nk)?;
    let v = split(v, nk)?;
    let mut logits = (q.matmul(&k.t()?)? * scale)?;
    if let Some(mask) = mask {
        logits = logits.broadcast_add(mask)?;
    }
    let probs = softmax_last_dim(&logits)?;
    let out = probs.matmul(&v)?;
    out.reshape((b, heads, nq, d))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, nq, inner))
}

/// Splits the last dimension in two equal halves.
pub fn chunk2_last(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let n = x.dim(D::Minus1)? / 2;
    Ok((x.narrow(D::Minus1, 0, n)?, x.narrow(D::Minus1, n, n)?))
}

/// Nearest-neighbour resize of `[B, C, H, W]` to `(h, w)` with PyTorch's `nearest` rule
/// (`src = floor(dst · in / out)`).
pub fn upsample_nearest(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (_, _, ih, iw) = x.dims4()?;
    if h == 2 * ih && w == 2 * iw {
        return x.upsample_nearest2d(h, w);
    }
    let idx = |out: usize, inp: usize| -> Result<Tensor> {
        let scale = inp as f32 / out as f32;
        let v: Vec<u32> = (0..out)
            .map(|o| (((o as f32) * scale).floor() as usize).min(inp - 1) as u32)
            .collect();
        Tensor::new(v, x.device())
    };
    let x = x.index_select(&idx(h, ih)?, 2)?;
    x.index_select(&idx(w, iw)?, 3)
}
