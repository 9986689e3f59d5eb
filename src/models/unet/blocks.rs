//! The UNet's down, middle and up blocks.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::attention::{Cond, Transformer2D, TransformerSpec};
use crate::models::nn::{self, upsample_nearest, Conv2d};
use crate::models::resnet::ResnetBlock2D;

/// Shared settings for the ResNets of one UNet.
#[derive(Debug, Clone, Copy)]
pub struct ResnetSpec {
    pub temb: usize,
    pub groups: usize,
    pub eps: f64,
}

/// `CrossAttnDownBlock2D` (with attentions) or `DownBlock2D` (without).
#[derive(Debug, Clone)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    downsample: Option<Conv2d>,
}

impl DownBlock {
    /// The transformers of this block, with their paths under `prefix`.
    pub fn visit_transformers(
        &mut self,
        prefix: &str,
        f: &mut dyn FnMut(&str, &mut Transformer2D),
    ) {
        for (j, a) in self.attentions.iter_mut().enumerate() {
            f(&format!("{prefix}.attentions.{j}"), a);
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        in_c: usize,
        out_c: usize,
        layers: usize,
        rs: ResnetSpec,
        attn: Option<TransformerSpec>,
        add_downsample: bool,
        downsample_padding: usize,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(layers);
        let mut attentions = Vec::new();
        for j in 0..layers {
            let ic = if j == 0 { in_c } else { out_c };
            resnets.push(ResnetBlock2D::new(
                vb.pp(format!("resnets.{j}")),
                ic,
                out_c,
                Some(rs.temb),
                rs.groups,
                rs.eps,
            )?);
            if let Some(spec) = attn {
                attentions.push(Transformer2D::new(vb.pp(format!("attentions.{j}")), spec)?);
            }
        }
        let downsample = if add_downsample {
            Some(Conv2d::new(
                vb.pp("downsamplers.0.conv"),
                out_c,
                out_c,
                3,
                2,
                downsample_padding,
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            downsample,
        })
    }

    /// Returns the block's output and pushes every skip connection onto `skips`.
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        cond: Cond,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut x = x.clone();
        for (j, r) in self.resnets.iter().enumerate() {
            x = r.forward(&x, Some(temb))?;
            if let Some(a) = self.attentions.get(j) {
                x = a.forward(&x, cond)?;
            }
            skips.push(x.clone());
        }
        if let Some(d) = &self.downsample {
            x = d.forward(&x)?;
            skips.push(x.clone());
        }
        Ok(x)
    }
}

/// `UNetMidBlock2DCrossAttn`.
#[derive(Debug, Clone)]
pub struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
}

impl MidBlock {
    /// The transformers of this block, with their paths under `prefix`.
    pub fn visit_transformers(
        &mut self,
        prefix: &str,
        f: &mut dyn FnMut(&str, &mut Transformer2D),
    ) {
        for (j, a) in self.attentions.iter_mut().enumerate() {
            f(&format!("{prefix}.attentions.{j}"), a);
        }
    }

    pub fn new(vb: VarBuilder, c: usize, rs: ResnetSpec, attn: TransformerSpec) -> Result<Self> {
        let res = |j: usize| {
            ResnetBlock2D::new(
                vb.pp(format!("resnets.{j}")),
                c,
                c,
                Some(rs.temb),
                rs.groups,
                rs.eps,
            )
        };
        Ok(Self {
            resnets: vec![res(0)?, res(1)?],
            attentions: vec![Transformer2D::new(vb.pp("attentions.0"), attn)?],
        })
    }

    pub fn forward(&self, x: &Tensor, temb: &Tensor, cond: Cond) -> Result<Tensor> {
        let mut x = self.resnets[0].forward(x, Some(temb))?;
        for (a, r) in self.attentions.iter().zip(&self.resnets[1..]) {
            x = a.forward(&x, cond)?;
            x = r.forward(&x, Some(temb))?;
        }
        Ok(x)
    }
}

/// `CrossAttnUpBlock2D` or `UpBlock2D`.
#[derive(Debug, Clone)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    upsample: Option<Conv2d>,
}

impl UpBlock {
    /// The transformers of this block, with their paths under `prefix`.
    pub fn visit_transformers(
        &mut self,
        prefix: &str,
        f: &mut dyn FnMut(&str, &mut Transformer2D),
    ) {
        for (j, a) in self.attentions.iter_mut().enumerate() {
            f(&format!("{prefix}.attentions.{j}"), a);
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        in_c: usize,
        prev_out_c: usize,
        out_c: usize,
        layers: usize,
        rs: ResnetSpec,
        attn: Option<TransformerSpec>,
        add_upsample: bool,
        upsample_large_map: bool,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(layers);
        let mut attentions = Vec::new();
        for j in 0..layers {
            let skip_c = if j + 1 == layers { in_c } else { out_c };
            let res_in = if j == 0 { prev_out_c } else { out_c };
            resnets.push(ResnetBlock2D::new(
                vb.pp(format!("resnets.{j}")),
                res_in + skip_c,
                out_c,
                Some(rs.temb),
                rs.groups,
                rs.eps,
            )?);
            if let Some(spec) = attn {
                attentions.push(Transformer2D::new(vb.pp(format!("attentions.{j}")), spec)?);
            }
        }
        let upsample = if add_upsample {
            // It runs on the upsampled map, one level up from the block's own.
            Some(nn::build_for_large_maps(upsample_large_map, || {
                Conv2d::new(vb.pp("upsamplers.0.conv"), out_c, out_c, 3, 1, 1)
            })?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsample,
        })
    }

    pub fn num_resnets(&self) -> usize {
        self.resnets.len()
    }

    /// Consumes this block's skip connections from the end of `skips`; `upsample_to` is the
    /// spatial size of the next skip connection, so odd sizes round-trip exactly.
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        cond: Cond,
        skips: &mut Vec<Tensor>,
        upsample_to: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut x = x.clone();
        for (j, r) in self.resnets.iter().enumerate() {
            let skip = skips.pop().ok_or_else(|| {
                candle_core::Error::Msg("UNet: skip connections exhausted".into())
            })?;
            x = Tensor::cat(&[&x, &skip], 1)?;
            x = r.forward(&x, Some(temb))?;
            if let Some(a) = self.attentions.get(j) {
                x = a.forward(&x, cond)?;
            }
        }
        if let Some(u) = &self.upsample {
            let (_, _, h, w) = x.dims4()?;
            let (th, tw) = upsample_to.unwrap_or((2 * h, 2 * w));
            x = u.forward(&upsample_nearest(&x, th, tw)?)?;
        }
        Ok(x)
    }
}
