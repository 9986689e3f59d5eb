//! The Stable Diffusion autoencoder (diffusers' `AutoencoderKL`).
//!
//! The encoder returns the diagonal Gaussian's mean and (clamped) log-variance: InstructPix2Pix
//! conditions on the mean (the distribution's mode), training targets use a sample.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::nn::{self, Conv2d, GroupNorm, Linear};
use super::resnet::ResnetBlock2D;

/// `vae/config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "d3")]
    pub in_channels: usize,
    #[serde(default = "d3")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d2")]
    pub layers_per_block: usize,
    #[serde(default = "d4")]
    pub latent_channels: usize,
    #[serde(default = "d32")]
    pub norm_num_groups: usize,
    #[serde(default = "dscale")]
    pub scaling_factor: f64,
    #[serde(default = "dtrue")]
    pub use_quant_conv: bool,
    #[serde(default = "dtrue")]
    pub use_post_quant_conv: bool,
    #[serde(default = "dtrue")]
    pub mid_block_add_attention: bool,
}

fn d2() -> usize {
    2
}
fn d3() -> usize {
    3
}
fn d4() -> usize {
    4
}
fn d32() -> usize {
    32
}
fn dscale() -> f64 {
    0.18215
}
fn dtrue() -> bool {
    true
}

const VAE_EPS: f64 = 1e-6;

/// Single-head spatial self-attention of the VAE's middle block.
#[derive(Debug, Clone)]
struct VaeAttention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ops: nn::Ops,
}

impl VaeAttention {
    fn new(vb: VarBuilder, c: usize, groups: usize) -> Result<Self> {
        // Checkpoints written before diffusers 0.14 (timbrooks/instruct-pix2pix among them) use
        // `query/key/value/proj_attn`; today's use `to_q/to_k/to_v/to_out.0`.
        let legacy = vb.contains_tensor("query.weight");
        let (q, k, v, o) = if legacy {
            ("query", "key", "value", "proj_attn")
        } else {
            ("to_q", "to_k", "to_v", "to_out.0")
        };
        Ok(Self {
            norm: GroupNorm::new(vb.pp("group_norm"), groups, c, VAE_EPS)?,
            q: Linear::new_maybe_conv(vb.pp(q), c, c)?,
            k: Linear::new_maybe_conv(vb.pp(k), c, c)?,
            v: Linear::new_maybe_conv(vb.pp(v), c, c)?,
            out: Linear::new_maybe_conv(vb.pp(o), c, c)?,
            ops: nn::Ops::current(),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let hs = self.norm.forward(x)?;
        let hs = hs.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let q = self.q.forward(&hs)?;
        let k = self.k.forward(&hs)?;
        let v = self.v.forward(&hs)?;
        let o = self.ops.attention(&q, &k, &v, 1, None)?;
        let o = self.out.forward(&o)?;
        let o = o.transpose(1, 2)?.reshape((b, c, h, w))?;
        o + x
    }
}

#[derive(Debug, Clone)]
struct MidBlock {
    res0: ResnetBlock2D,
    attn: Option<VaeAttention>,
    res1: ResnetBlock2D,
}

impl MidBlock {
    fn new(vb: VarBuilder, c: usize, groups: usize, attn: bool) -> Result<Self> {
        Ok(Self {
            res0: ResnetBlock2D::new(vb.pp("resnets.0"), c, c, None, groups, VAE_EPS)?,
            attn: if attn {
                Some(VaeAttention::new(vb.pp("attentions.0"), c, groups)?)
            } else {
                None
            },
            res1: ResnetBlock2D::new(vb.pp("resnets.1"), c, c, None, groups, VAE_EPS)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.res0.forward(x, None)?;
        if let Some(a) = &self.attn {
            x = a.forward(&x)?;
        }
        self.res1.forward(&x, None)
    }
}

#[derive(Debug, Clone)]
struct EncoderBlock {
    resnets: Vec<ResnetBlock2D>,
    down: Option<Conv2d>,
}

#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv2d,
    blocks: Vec<EncoderBlock>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, c: &VaeConfig) -> Result<Self> {
        let ch = &c.block_out_channels;
        let g = c.norm_num_groups;
        let conv_in = Conv2d::new(vb.pp("conv_in"), c.in_channels, ch[0], 3, 1, 1)?;
        let mut blocks = Vec::new();
        let mut out_c = ch[0];
        for (i, &bc) in ch.iter().enumerate() {
            let in_c = out_c;
            out_c = bc;
            let bvb = vb.pp(format!("down_blocks.{i}"));
            let resnets = (0..c.layers_per_block)
                .map(|j| {
                    let ic = if j == 0 { in_c } else { out_c };
                    ResnetBlock2D::new(bvb.pp(format!("resnets.{j}")), ic, out_c, None, g, VAE_EPS)
                })
                .collect::<Result<Vec<_>>>()?;
            let down = if i + 1 < ch.len() {
                // diffusers pads right and bottom by one, then convolves without padding.
                Some(Conv2d::with_padding(
                    bvb.pp("downsamplers.0.conv"),
                    out_c,
                    out_c,
                    3,
                    2,
                    (0, 1),
                )?)
            } else {
                None
            };
            blocks.push(EncoderBlock { resnets, down });
        }
        let last = ch[ch.len() - 1];
        Ok(Self {
            conv_in,
            blocks,
            mid: MidBlock::new(vb.pp("mid_block"), last, g, c.mid_block_add_attention)?,
            norm_out: GroupNorm::new(vb.pp("conv_norm_out"), g, last, VAE_EPS)?,
            conv_out: Conv2d::new(vb.pp("conv_out"), last, 2 * c.latent_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_in.forward(x)?;
        for b in &self.blocks {
            for r in &b.resnets {
                x = r.forward(&x, None)?;
            }
            if let Some(d) = &b.down {
                x = d.forward(&x)?;
            }
        }
        let x = self.mid.forward(&x)?;
        self.conv_out.forward(&self.norm_out.forward_silu(&x)?)
    }
}

#[derive(Debug, Clone)]
struct DecoderBlock {
    resnets: Vec<ResnetBlock2D>,
    up: Option<Conv2d>,
}

#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    blocks: Vec<DecoderBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, c: &VaeConfig) -> Result<Self> {
        let ch: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let g = c.norm_num_groups;
        let conv_in = Conv2d::new(vb.pp("conv_in"), c.latent_channels, ch[0], 3, 1, 1)?;
        let mid = MidBlock::new(vb.pp("mid_block"), ch[0], g, c.mid_block_add_attention)?;
        let mut blocks = Vec::new();
        let mut out_c = ch[0];
        for (i, &bc) in ch.iter().enumerate() {
            let in_c = out_c;
            out_c = bc;
            let bvb = vb.pp(format!("up_blocks.{i}"));
            let resnets = (0..c.layers_per_block + 1)
                .map(|j| {
                    let ic = if j == 0 { in_c } else { out_c };
                    ResnetBlock2D::new(bvb.pp(format!("resnets.{j}")), ic, out_c, None, g, VAE_EPS)
                })
                .collect::<Result<Vec<_>>>()?;
            let up = if i + 1 < ch.len() {
                Some(Conv2d::new(
                    bvb.pp("upsamplers.0.conv"),
                    out_c,
                    out_c,
                    3,
                    1,
                    1,
                )?)
            } else {
                None
            };
            blocks.push(DecoderBlock { resnets, up });
        }
        let last = ch[ch.len() - 1];
        Ok(Self {
            conv_in,
            mid,
            blocks,
            norm_out: GroupNorm::new(vb.pp("conv_norm_out"), g, last, VAE_EPS)?,
            conv_out: Conv2d::new(vb.pp("conv_out"), last, c.out_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let x = self.conv_in.forward(z)?;
        let mut x = self.mid.forward(&x)?;
        for b in &self.blocks {
            for r in &b.resnets {
                x = r.forward(&x, None)?;
            }
            if let Some(u) = &b.up {
                let (_, _, h, w) = x.dims4()?;
                x = u.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward_silu(&x)?)
    }
}

/// The encoder's output distribution.
#[derive(Debug, Clone)]
pub struct LatentDist {
    /// Mean, also the mode. `[B, latent, h, w]`.
    pub mean: Tensor,
    /// Log-variance, clamped to `[-30, 20]` as diffusers does.
    pub logvar: Tensor,
}

impl LatentDist {
    /// `mean + exp(logvar / 2) · noise`, with the caller's unit Gaussian `noise`.
    pub fn sample_with(&self, noise: &Tensor) -> Result<Tensor> {
        let std = (&self.logvar * 0.5)?.exp()?;
        self.mean.add(&std.mul(noise)?)
    }
}

/// `AutoencoderKL`.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: VaeConfig,
}

impl AutoencoderKL {
    pub fn new(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        let l = config.latent_channels;
        let quant_conv = if config.use_quant_conv {
            Some(Conv2d::new(vb.pp("quant_conv"), 2 * l, 2 * l, 1, 1, 0)?)
        } else {
            None
        };
        let post_quant_conv = if config.use_post_quant_conv {
            Some(Conv2d::new(vb.pp("post_quant_conv"), l, l, 1, 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), config)?,
            decoder: Decoder::new(vb.pp("decoder"), config)?,
            quant_conv,
            post_quant_conv,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// How many pixels one latent covers along each side (8 for SD).
    pub fn scale_factor(&self) -> usize {
        1 << (self.config.block_out_channels.len() - 1)
    }

    /// `x: [B, 3, H, W]` in `[-1, 1]` → the latent Gaussian.
    pub fn encode(&self, x: &Tensor) -> Result<LatentDist> {
        let mut h = self.encoder.forward(x)?;
        if let Some(q) = &self.quant_conv {
            h = q.forward(&h)?;
        }
        let l = self.config.latent_channels;
        let mean = h.narrow(1, 0, l)?;
        let logvar = h.narrow(1, l, l)?.clamp(-30f32, 20f32)?;
        Ok(LatentDist { mean, logvar })
    }

    /// Raw decoder: latents `z` (already divided by the scaling factor) → image in about `[-1, 1]`.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }
}
