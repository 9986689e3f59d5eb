//! `Transformer2DModel` and its `BasicTransformerBlock`: self-attention, cross-attention to the
//! text, and a GEGLU feed-forward.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::models::nn::{self, Conv2d, GroupNorm, LayerMut, LayerNorm, Linear, LogitControl};

/// What a UNet call is conditioned on: the text context, and any control of its
/// self-attention (Prompt-to-Prompt).
#[derive(Debug, Clone, Copy)]
pub struct Cond<'a> {
    /// `[B, T, cross_attention_dim]`.
    pub context: &'a Tensor,
    /// Applied in every self-attention layer (`attn1`).
    pub self_attn: LogitControl<'a>,
}

impl<'a> Cond<'a> {
    pub fn text(context: &'a Tensor) -> Self {
        Self {
            context,
            self_attn: LogitControl::default(),
        }
    }
}

/// diffusers' `Attention` (no biases on q/k/v, bias on the output projection).
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    ops: nn::Ops,
    /// An A1111 hypernetwork rewriting the context of the keys and values.
    hyper: Option<std::sync::Arc<crate::loader::hypernetwork::Hypernetwork>>,
}

impl Attention {
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: Linear::new(vb.pp("to_q"), query_dim, inner, false)?,
            to_k: Linear::new(vb.pp("to_k"), context_dim, inner, false)?,
            to_v: Linear::new(vb.pp("to_v"), context_dim, inner, false)?,
            to_out: Linear::new(vb.pp("to_out.0"), inner, query_dim, true)?,
            heads,
            ops: nn::Ops::current(),
            hyper: None,
        })
    }

    /// Applies (or removes) a hypernetwork: where it has modules for this layer's context
    /// width, the keys and values are computed from the contexts they rewrite.
    pub fn set_hypernetwork(
        &mut self,
        h: Option<std::sync::Arc<crate::loader::hypernetwork::Hypernetwork>>,
    ) {
        self.hyper = h;
    }

    /// Every projection (`to_q`, `to_k`, `to_v`, `to_out.0`) with its path under `prefix`.
    pub fn visit_projections(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Linear)) {
        f(&format!("{prefix}.to_q"), &mut self.to_q);
        f(&format!("{prefix}.to_k"), &mut self.to_k);
        f(&format!("{prefix}.to_v"), &mut self.to_v);
        f(&format!("{prefix}.to_out.0"), &mut self.to_out);
    }

    /// `x: [B, N, C]`; `context: [B, M, C']` for cross-attention, `None` for self-attention.
    pub fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        ctl: LogitControl,
    ) -> Result<Tensor> {
        let ctx = context.unwrap_or(x);
        let q = self.to_q.forward(x)?;
        let pair = match &self.hyper {
            Some(h) => h.for_width(ctx.dim(D::Minus1)?),
            None => None,
        };
        let (k, v) = match pair {
            Some((hk, hv)) => (
                self.to_k.forward(&hk.forward(ctx)?)?,
                self.to_v.forward(&hv.forward(ctx)?)?,
            ),
            None => (self.to_k.forward(ctx)?, self.to_v.forward(ctx)?),
        };
        let o = self.ops.attention_with(&q, &k, &v, self.heads, ctl)?;
        self.to_out.forward(&o)
    }
}

#[derive(Debug, Clone)]
struct FeedForward {
    proj: Linear,
    out: Linear,
    ops: nn::Ops,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj: Linear::new(vb.pp("net.0.proj"), dim, inner * 2, true)?,
            out: Linear::new(vb.pp("net.2"), inner, dim, true)?,
            ops: nn::Ops::current(),
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out.forward(&self.ops.geglu(&self.proj.forward(x)?)?)
    }
}

#[derive(Debug, Clone)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
    only_cross_attention: bool,
}

impl BasicTransformerBlock {
    fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        head_dim: usize,
        context_dim: usize,
        only_cross_attention: bool,
    ) -> Result<Self> {
        let self_ctx = if only_cross_attention {
            context_dim
        } else {
            dim
        };
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::new(vb.pp("attn1"), dim, self_ctx, heads, head_dim)?,
            norm2: LayerNorm::new(vb.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::new(vb.pp("attn2"), dim, context_dim, heads, head_dim)?,
            norm3: LayerNorm::new(vb.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
            only_cross_attention,
        })
    }

    fn forward(&self, x: &Tensor, cond: Cond) -> Result<Tensor> {
        let n = self.norm1.forward(x)?;
        let a = if self.only_cross_attention {
            self.attn1
                .forward(&n, Some(cond.context), LogitControl::default())?
        } else {
            self.attn1.forward(&n, None, cond.self_attn)?
        };
        let x = (a + x)?;
        let x = (self.attn2.forward(
            &self.norm2.forward(&x)?,
            Some(cond.context),
            LogitControl::default(),
        )? + x)?;
        self.ff.forward(&self.norm3.forward(&x)?)? + x
    }
}

#[derive(Debug, Clone)]
enum Proj {
    Conv(Conv2d),
    Linear(Linear),
}

/// Settings of one `Transformer2DModel`.
#[derive(Debug, Clone, Copy)]
pub struct TransformerSpec {
    pub channels: usize,
    pub heads: usize,
    pub context_dim: usize,
    pub layers: usize,
    pub groups: usize,
    pub linear_projection: bool,
    pub only_cross_attention: bool,
}

/// diffusers' `Transformer2DModel` for continuous inputs.
#[derive(Debug, Clone)]
pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Proj,
    ops: nn::Ops,
}

impl Transformer2D {
    pub fn new(vb: VarBuilder, s: TransformerSpec) -> Result<Self> {
        let c = s.channels;
        let head_dim = c / s.heads;
        let inner = s.heads * head_dim;
        let (proj_in, proj_out) = if s.linear_projection {
            (
                Proj::Linear(Linear::new(vb.pp("proj_in"), c, inner, true)?),
                Proj::Linear(Linear::new(vb.pp("proj_out"), inner, c, true)?),
            )
        } else {
            (
                Proj::Conv(Conv2d::new(vb.pp("proj_in"), c, inner, 1, 1, 0)?),
                Proj::Conv(Conv2d::new(vb.pp("proj_out"), inner, c, 1, 1, 0)?),
            )
        };
        let blocks = (0..s.layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    vb.pp(format!("transformer_blocks.{i}")),
                    inner,
                    s.heads,
                    head_dim,
                    s.context_dim,
                    s.only_cross_attention,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::new(vb.pp("norm"), s.groups, c, 1e-6)?,
            proj_in,
            blocks,
            proj_out,
            ops: nn::Ops::current(),
        })
    }

    /// Every layer a per-request LoRA may change (`proj_in`, both attentions' projections, the
    /// feed-forward's two, `proj_out`), with its path under `prefix`.
    pub fn visit_layers(&mut self, prefix: &str, f: &mut dyn FnMut(&str, LayerMut)) {
        fn proj(p: &mut Proj) -> LayerMut<'_> {
            match p {
                Proj::Conv(c) => LayerMut::Conv(c),
                Proj::Linear(l) => LayerMut::Linear(l),
            }
        }
        f(&format!("{prefix}.proj_in"), proj(&mut self.proj_in));
        for (i, blk) in self.blocks.iter_mut().enumerate() {
            let p = format!("{prefix}.transformer_blocks.{i}");
            for (name, attn) in [("attn1", &mut blk.attn1), ("attn2", &mut blk.attn2)] {
                attn.visit_projections(&format!("{p}.{name}"), &mut |q, l| {
                    f(q, LayerMut::Linear(l))
                });
            }
            f(
                &format!("{p}.ff.net.0.proj"),
                LayerMut::Linear(&mut blk.ff.proj),
            );
            f(&format!("{p}.ff.net.2"), LayerMut::Linear(&mut blk.ff.out));
        }
        f(&format!("{prefix}.proj_out"), proj(&mut self.proj_out));
    }

    /// Both attention layers of every transformer block, with their paths under `prefix`.
    pub fn visit_attentions(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Attention)) {
        for (i, blk) in self.blocks.iter_mut().enumerate() {
            let p = format!("{prefix}.transformer_blocks.{i}");
            f(&format!("{p}.attn1"), &mut blk.attn1);
            f(&format!("{p}.attn2"), &mut blk.attn2);
        }
    }

    pub fn forward(&self, x: &Tensor, cond: Cond) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let hs = self.norm.forward(x)?;
        let to_tokens = |t: Tensor| -> Result<Tensor> {
            let ch = t.dim(1)?;
            self.ops.transpose_last2(&t.reshape((b, ch, h * w))?)
        };
        let _p = ip2p_cpu::profile::scope("transformer (all)");
        let mut hs = match &self.proj_in {
            Proj::Conv(p) => to_tokens(p.forward(&hs)?)?,
            Proj::Linear(p) => p.forward(&to_tokens(hs)?)?,
        };
        for blk in &self.blocks {
            hs = blk.forward(&hs, cond)?;
        }
        let to_map = |t: Tensor| -> Result<Tensor> {
            let ch = t.dim(2)?;
            self.ops.transpose_last2(&t)?.reshape((b, ch, h, w))
        };
        let out = match &self.proj_out {
            Proj::Conv(p) => p.forward(&to_map(hs)?)?,
            Proj::Linear(p) => to_map(p.forward(&hs)?)?,
        };
        debug_assert_eq!(out.dim(1)?, c);
        out + x
    }
}
