//! diffusers' `ResnetBlock2D`, shared by the VAE and the UNet.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::nn::{Conv2d, GroupNorm, Linear};

/// diffusers' `ResnetBlock2D`, with an optional time-embedding projection (UNet) or none (VAE).
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    pub fn new(
        vb: VarBuilder,
        in_c: usize,
        out_c: usize,
        temb_c: Option<usize>,
        groups: usize,
        eps: f64,
    ) -> Result<Self> {
        let time_emb_proj = match temb_c {
            Some(t) => Some(Linear::new(vb.pp("time_emb_proj"), t, out_c, true)?),
            None => None,
        };
        let shortcut = if in_c != out_c {
            Some(Conv2d::new(vb.pp("conv_shortcut"), in_c, out_c, 1, 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::new(vb.pp("norm1"), groups, in_c, eps)?,
            conv1: Conv2d::new(vb.pp("conv1"), in_c, out_c, 3, 1, 1)?,
            time_emb_proj,
            norm2: GroupNorm::new(vb.pp("norm2"), groups, out_c, eps)?,
            conv2: Conv2d::new(vb.pp("conv2"), out_c, out_c, 3, 1, 1)?,
            shortcut,
        })
    }

    /// `temb` is the already-computed time embedding `[B, temb_c]` (SiLU is applied here).
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let _p = ip2p_cpu::profile::scope("resnet (all)");
        let mut h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&candle_nn::ops::silu(temb)?)?;
            h = h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?;
        }
        let skip = match &self.shortcut {
            Some(s) => s.forward(x)?,
            None => x.clone(),
        };
        // diffusers: `input_tensor + conv2(...)`, output scale 1.
        self.conv2.forward_add(&self.norm2.forward_silu(&h)?, &skip)
    }
}
