//! diffusers' `UNet2DConditionModel`, built from `unet/config.json`.
//!
//! Covers Stable Diffusion 1.x/2.x and InstructPix2Pix (`in_channels` 4, 8 or 9), any latent
//! size: upsampling follows the skip connection's size, as diffusers does for sizes that are not
//! multiples of 64 px.

pub mod attention;
pub mod blocks;
pub mod embeddings;

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

pub use self::attention::Cond;
use self::attention::TransformerSpec;
use self::blocks::{DownBlock, MidBlock, ResnetSpec, UpBlock};
use self::embeddings::{timestep_embedding, timesteps_to_vec, TimestepMlp};
use super::nn::{self, Conv2d, GroupNorm, Linear};

/// A config value that is either one number for every block or one per block.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    pub fn get(&self, i: usize) -> usize {
        match self {
            PerBlock::One(v) => *v,
            PerBlock::Each(v) => v
                .get(i)
                .copied()
                .unwrap_or_else(|| v.last().copied().unwrap_or(1)),
        }
    }
}

/// `unet/config.json` (the fields Stable Diffusion 1.x/2.x and InstructPix2Pix use).
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "d4")]
    pub in_channels: usize,
    #[serde(default = "d4")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d2")]
    pub layers_per_block: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "mid_default")]
    pub mid_block_type: Option<String>,
    #[serde(default = "heads_default")]
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    pub cross_attention_dim: PerBlock,
    #[serde(default = "one")]
    pub transformer_layers_per_block: PerBlock,
    #[serde(default = "d32")]
    pub norm_num_groups: usize,
    #[serde(default = "eps_default")]
    pub norm_eps: f64,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "dtrue")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d1")]
    pub downsample_padding: usize,
    #[serde(default)]
    pub only_cross_attention: bool,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "d3")]
    pub conv_in_kernel: usize,
    #[serde(default = "d3")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub sample_size: Option<usize>,
}

fn d1() -> usize {
    1
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
fn one() -> PerBlock {
    PerBlock::One(1)
}
fn heads_default() -> PerBlock {
    PerBlock::One(8)
}
fn eps_default() -> f64 {
    1e-5
}
fn dtrue() -> bool {
    true
}
fn mid_default() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}

impl UNetConfig {
    /// Checks that the config describes a UNet this implementation builds exactly.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err("block_out_channels, down_block_types and up_block_types must have the same non-zero length".into());
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return Err(format!("unsupported down block type {t}"));
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return Err(format!("unsupported up block type {t}"));
            }
        }
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => {}
            other => return Err(format!("unsupported mid block type {other:?}")),
        }
        if self.class_embed_type.is_some()
            || self.addition_embed_type.is_some()
            || self.time_cond_proj_dim.is_some()
        {
            return Err("class/addition embeddings (SDXL, LCM) are not supported".into());
        }
        if self.conv_in_kernel != 3 || self.conv_out_kernel != 3 {
            return Err("only 3×3 conv_in/conv_out kernels are supported".into());
        }
        for &c in &self.block_out_channels {
            if c % self.norm_num_groups != 0 {
                return Err(format!(
                    "{c} channels are not divisible by {} groups",
                    self.norm_num_groups
                ));
            }
        }
        Ok(())
    }

    fn heads(&self, i: usize) -> usize {
        // diffusers' historical naming: `attention_head_dim` holds the number of heads when
        // `num_attention_heads` is unset.
        self.num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .get(i)
    }

    /// How many times the UNet halves the latent resolution.
    pub fn num_downsamples(&self) -> usize {
        self.block_out_channels.len() - 1
    }
}

/// The conditional UNet.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_embedding: TimestepMlp,
    down: Vec<DownBlock>,
    mid: MidBlock,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    config: UNetConfig,
}

impl UNet2DConditionModel {
    pub fn new(vb: VarBuilder, config: &UNetConfig) -> Result<Self> {
        config.validate().map_err(candle_core::Error::Msg)?;
        let c = config;
        let ch = &c.block_out_channels;
        let n = ch.len();
        let temb = ch[0] * 4;
        let rs = ResnetSpec {
            temb,
            groups: c.norm_num_groups,
            eps: c.norm_eps,
        };
        let spec = |i: usize, channels: usize| TransformerSpec {
            channels,
            heads: c.heads(i),
            context_dim: c.cross_attention_dim.get(i),
            layers: c.transformer_layers_per_block.get(i),
            groups: c.norm_num_groups,
            linear_projection: c.use_linear_projection,
            only_cross_attention: c.only_cross_attention,
        };
        // Levels 0 and 1 (at least half the latent's side) count as large maps for the choice
        // of convolution algorithm (`nn::build_for_large_maps`).
        let large_map = |level: usize| level <= 1;
        let conv_in = Conv2d::new(vb.pp("conv_in"), c.in_channels, ch[0], 3, 1, 1)?;
        let time_embedding = TimestepMlp::new(vb.pp("time_embedding"), ch[0], temb)?;
        let mut down = Vec::with_capacity(n);
        let mut out_c = ch[0];
        for (i, t) in c.down_block_types.iter().enumerate() {
            let in_c = out_c;
            out_c = ch[i];
            let attn = (t == "CrossAttnDownBlock2D").then(|| spec(i, out_c));
            down.push(nn::build_for_large_maps(large_map(i), || {
                DownBlock::new(
                    vb.pp(format!("down_blocks.{i}")),
                    in_c,
                    out_c,
                    c.layers_per_block,
                    rs,
                    attn,
                    i + 1 < n,
                    c.downsample_padding,
                )
            })?);
        }
        let mid = MidBlock::new(vb.pp("mid_block"), ch[n - 1], rs, spec(n - 1, ch[n - 1]))?;
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut up = Vec::with_capacity(n);
        let mut out_c = rev[0];
        for (i, t) in c.up_block_types.iter().enumerate() {
            let prev_out = out_c;
            out_c = rev[i];
            let in_c = rev[(i + 1).min(n - 1)];
            let block_idx = n - 1 - i;
            let attn = (t == "CrossAttnUpBlock2D").then(|| spec(block_idx, out_c));
            // The upsampler's output is one level up (block_idx − 1).
            let upsample_large = block_idx == 0 || large_map(block_idx - 1);
            up.push(nn::build_for_large_maps(large_map(block_idx), || {
                UpBlock::new(
                    vb.pp(format!("up_blocks.{i}")),
                    in_c,
                    prev_out,
                    out_c,
                    c.layers_per_block + 1,
                    rs,
                    attn,
                    i + 1 < n,
                    upsample_large,
                )
            })?);
        }
        Ok(Self {
            conv_in,
            time_embedding,
            down,
            mid,
            up,
            norm_out: GroupNorm::new(vb.pp("conv_norm_out"), c.norm_num_groups, ch[0], c.norm_eps)?,
            conv_out: Conv2d::new(vb.pp("conv_out"), ch[0], c.out_channels, 3, 1, 1)?,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Every attention projection (`…attn1.to_q`, …, `…attn2.to_out.0`) with its parameter path,
    /// for LoRA adapters.
    pub fn visit_attention_projections(&mut self, f: &mut dyn FnMut(&str, &mut Linear)) {
        self.visit_attentions(&mut |p, a| a.visit_projections(p, f));
    }

    /// Every attention layer (`…attn1`, `…attn2`) with its path.
    pub fn visit_attentions(&mut self, f: &mut dyn FnMut(&str, &mut attention::Attention)) {
        self.visit_transformers(&mut |p, t| t.visit_attentions(p, f));
    }

    /// Every layer of the transformer blocks a per-request LoRA may change (see
    /// [`attention::Transformer2D::visit_layers`]), with its parameter path.
    pub fn visit_layers(&mut self, f: &mut dyn FnMut(&str, nn::LayerMut)) {
        self.visit_transformers(&mut |p, t| t.visit_layers(p, f));
    }

    fn visit_transformers(&mut self, f: &mut dyn FnMut(&str, &mut attention::Transformer2D)) {
        for (i, d) in self.down.iter_mut().enumerate() {
            d.visit_transformers(&format!("down_blocks.{i}"), f);
        }
        self.mid.visit_transformers("mid_block", f);
        for (i, u) in self.up.iter_mut().enumerate() {
            u.visit_transformers(&format!("up_blocks.{i}"), f);
        }
    }

    /// Applies an A1111 hypernetwork to every attention layer (`None` removes it).
    pub fn set_hypernetwork(
        &mut self,
        h: Option<std::sync::Arc<crate::loader::hypernetwork::Hypernetwork>>,
    ) {
        self.visit_attentions(&mut |_, a| a.set_hypernetwork(h.clone()));
    }

    /// `sample: [B, in_channels, h, w]`, `timestep`: a scalar or one per sample `[B]`,
    /// `context: [B, T, cross_attention_dim]` → predicted noise `[B, out_channels, h, w]`.
    pub fn forward(&self, sample: &Tensor, timestep: &Tensor, context: &Tensor) -> Result<Tensor> {
        self.forward_cond(sample, timestep, Cond::text(context))
    }

    /// [`Self::forward`] with control over the self-attention layers (Prompt-to-Prompt).
    pub fn forward_cond(&self, sample: &Tensor, timestep: &Tensor, cond: Cond) -> Result<Tensor> {
        let (b, _, h, w) = sample.dims4()?;
        let mut ts = timesteps_to_vec(timestep)?;
        if ts.len() == 1 && b > 1 {
            ts = vec![ts[0]; b];
        }
        if ts.len() != b {
            candle_core::bail!("UNet: {} timesteps for a batch of {b}", ts.len());
        }
        let c0 = self.config.block_out_channels[0];
        let t_emb = timestep_embedding(
            &ts,
            c0,
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
            sample.device(),
        )?
        .to_dtype(sample.dtype())?;
        let temb = self.time_embedding.forward(&t_emb)?;

        let sample = if self.config.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample.clone()
        };
        let up_factor = 1usize << self.config.num_downsamples();
        let forward_upsample_size = h % up_factor != 0 || w % up_factor != 0;

        let mut x = self.conv_in.forward(&sample)?;
        let mut skips = vec![x.clone()];
        for d in &self.down {
            x = d.forward(&x, &temb, cond, &mut skips)?;
        }
        x = self.mid.forward(&x, &temb, cond)?;
        let n = self.up.len();
        for (i, u) in self.up.iter().enumerate() {
            let remaining = skips.len().saturating_sub(u.num_resnets());
            let upsample_to = if i + 1 < n && forward_upsample_size && remaining > 0 {
                let (_, _, sh, sw) = skips[remaining - 1].dims4()?;
                Some((sh, sw))
            } else {
                None
            };
            x = u.forward(&x, &temb, cond, &mut skips, upsample_to)?;
        }
        self.conv_out.forward(&self.norm_out.forward_silu(&x)?)
    }
}
