//! CLIP (transformers' `CLIPTextModel`, `CLIPVisionModel` and `CLIPModel`).
//!
//! Stable Diffusion conditions on the text tower's last hidden state after the final layer norm;
//! the dataset generator filters image pairs with the full model's projected, L2-normalised
//! image and text embeddings.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;

use super::nn::{self, LayerMut, LayerNorm, Linear};

/// The activation inside CLIP's MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    QuickGelu,
    #[serde(alias = "gelu_new", alias = "gelu_pytorch_tanh")]
    Gelu,
}

/// `text_encoder/config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub projection_dim: Option<usize>,
    /// Token whose position is pooled. Configs written before transformers 4.31 say `2`,
    /// which means "the highest id in the sequence" (CLIP's EOS is the last vocabulary entry).
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
}

fn default_eos() -> u32 {
    49407
}

/// `vision_config` of a `CLIPModel`.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

fn default_channels() -> usize {
    3
}

/// A `CLIPModel`'s `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipConfig {
    pub text_config: ClipTextConfig,
    pub vision_config: ClipVisionConfig,
    pub projection_dim: usize,
}

/// The shape of one transformer layer stack.
#[derive(Debug, Clone, Copy)]
struct EncoderSpec {
    hidden: usize,
    intermediate: usize,
    heads: usize,
    act: Activation,
    eps: f64,
}

impl From<&ClipTextConfig> for EncoderSpec {
    fn from(c: &ClipTextConfig) -> Self {
        Self {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            act: c.hidden_act,
            eps: c.layer_norm_eps,
        }
    }
}

impl From<&ClipVisionConfig> for EncoderSpec {
    fn from(c: &ClipVisionConfig) -> Self {
        Self {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            act: c.hidden_act,
            eps: c.layer_norm_eps,
        }
    }
}

fn default_act() -> Activation {
    Activation::QuickGelu
}
fn default_eps() -> f64 {
    1e-5
}

#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    ops: nn::Ops,
}

impl Attention {
    fn new(vb: VarBuilder, c: EncoderSpec) -> Result<Self> {
        let h = c.hidden;
        Ok(Self {
            q: Linear::new(vb.pp("q_proj"), h, h, true)?,
            k: Linear::new(vb.pp("k_proj"), h, h, true)?,
            v: Linear::new(vb.pp("v_proj"), h, h, true)?,
            out: Linear::new(vb.pp("out_proj"), h, h, true)?,
            heads: c.heads,
            ops: nn::Ops::current(),
        })
    }

    fn forward(&self, x: &Tensor, causal: bool) -> Result<Tensor> {
        let q = self.q.forward(x)?;
        let k = self.k.forward(x)?;
        let v = self.v.forward(x)?;
        let o = if causal {
            self.ops.attention_causal(&q, &k, &v, self.heads)?
        } else {
            self.ops.attention(&q, &k, &v, self.heads, None)?
        };
        self.out.forward(&o)
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    ln1: LayerNorm,
    attn: Attention,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, c: EncoderSpec) -> Result<Self> {
        Ok(Self {
            ln1: LayerNorm::new(vb.pp("layer_norm1"), c.hidden, c.eps)?,
            attn: Attention::new(vb.pp("self_attn"), c)?,
            ln2: LayerNorm::new(vb.pp("layer_norm2"), c.hidden, c.eps)?,
            fc1: Linear::new(vb.pp("mlp.fc1"), c.hidden, c.intermediate, true)?,
            fc2: Linear::new(vb.pp("mlp.fc2"), c.intermediate, c.hidden, true)?,
            act: c.act,
        })
    }

    /// `causal`: token `i` attends to tokens `j ≤ i` only (the text encoder).
    fn forward(&self, x: &Tensor, causal: bool) -> Result<Tensor> {
        let h = (x + self.attn.forward(&self.ln1.forward(x)?, causal)?)?;
        let m = self.fc1.forward(&self.ln2.forward(&h)?)?;
        let m = match self.act {
            Activation::QuickGelu => self.attn.ops.quick_gelu(&m)?,
            Activation::Gelu => nn::gelu(&m)?,
        };
        h + self.fc2.forward(&m)?
    }
}

/// The CLIP text transformer.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_ln: LayerNorm,
    config: ClipTextConfig,
}

impl ClipTextModel {
    /// Every linear layer of the encoder (attention projections and MLP), with its parameter
    /// path (`text_model.encoder.layers.N.self_attn.q_proj`, …), for per-request LoRA.
    pub fn visit_layers(&mut self, f: &mut dyn FnMut(&str, LayerMut)) {
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("text_model.encoder.layers.{i}");
            let a = &mut l.attn;
            for (name, lin) in [
                ("q_proj", &mut a.q),
                ("k_proj", &mut a.k),
                ("v_proj", &mut a.v),
                ("out_proj", &mut a.out),
            ] {
                f(&format!("{p}.self_attn.{name}"), LayerMut::Linear(lin));
            }
            f(&format!("{p}.mlp.fc1"), LayerMut::Linear(&mut l.fc1));
            f(&format!("{p}.mlp.fc2"), LayerMut::Linear(&mut l.fc2));
        }
    }

    /// Builds the model. `vb` may point at the file root: both the transformers-4 layout
    /// (`text_model.` prefix) and the bare layout are accepted.
    pub fn new(vb: VarBuilder, config: &ClipTextConfig) -> Result<Self> {
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        let c = config;
        let emb = vb.pp("embeddings");
        let token_embedding =
            candle_nn::embedding(c.vocab_size, c.hidden_size, emb.pp("token_embedding"))?;
        let position_embedding = emb.get(
            (c.max_position_embeddings, c.hidden_size),
            "position_embedding.weight",
        )?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| EncoderLayer::new(vb.pp(format!("encoder.layers.{i}")), c.into()))
            .collect::<Result<Vec<_>>>()?;
        let final_ln = LayerNorm::new(vb.pp("final_layer_norm"), c.hidden_size, c.layer_norm_eps)?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_ln,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// The token embedding table `[vocab, hidden]`.
    pub fn token_embedding(&self) -> &Tensor {
        self.token_embedding.embeddings()
    }

    /// The embedding table cut or zero-padded to `rows` rows, as transformers'
    /// `resize_token_embeddings` to a tokenizer's length makes it.
    pub fn token_table(&self, rows: usize) -> Result<Tensor> {
        let table = self.token_embedding.embeddings();
        let (have, hidden) = table.dims2()?;
        let kept = table.narrow(0, 0, have.min(rows))?;
        if rows <= have {
            return Ok(kept);
        }
        let pad = Tensor::zeros((rows - have, hidden), table.dtype(), table.device())?;
        Tensor::cat(&[kept, pad], 0)
    }

    /// Gives ids `first..first + n` the rows of `vectors` `[n, hidden]` (a Textual Inversion
    /// embedding; `first` is the tokenizer's length before the tokens were added), after
    /// [`Self::token_table`]`(first)`.
    pub fn add_token_embeddings(&mut self, first: usize, vectors: &Tensor) -> Result<()> {
        let (n, dim) = vectors.dims2()?;
        let hidden = self.config.hidden_size;
        if dim != hidden {
            candle_core::bail!("vectors of width {dim}; this text encoder's is {hidden}");
        }
        let kept = self.token_table(first)?;
        let vectors = vectors.to_device(kept.device())?.to_dtype(kept.dtype())?;
        let table = Tensor::cat(&[kept, vectors], 0)?;
        self.config.vocab_size = first + n;
        self.token_embedding = Embedding::new(table, hidden);
        Ok(())
    }

    /// `input_ids: [B, T]` (u32 or i64) → last hidden state `[B, T, hidden]`.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let ids = input_ids.to_dtype(DType::U32)?;
        let tok = self.token_embedding.forward(&ids)?;
        self.forward_embeddings(&tok.reshape((b, t, self.config.hidden_size))?)
    }

    /// Runs the transformer on token embeddings `[B, T, hidden]` (position embeddings are added here).
    pub fn forward_embeddings(&self, tok: &Tensor) -> Result<Tensor> {
        let (_, t, _) = tok.dims3()?;
        if t > self.config.max_position_embeddings {
            candle_core::bail!(
                "sequence of {t} tokens is longer than the model's {} positions",
                self.config.max_position_embeddings
            );
        }
        let pos = self.position_embedding.narrow(0, 0, t)?;
        let mut x = tok.broadcast_add(&pos)?;
        for layer in &self.layers {
            x = layer.forward(&x, true)?;
        }
        self.final_ln.forward(&x)
    }
}

/// The CLIP vision transformer: patch and class embeddings, pre-norm, encoder, and the
/// post-norm of the class token (the pooled output).
#[derive(Debug, Clone)]
pub struct ClipVisionModel {
    patch_weight: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_ln: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_ln: LayerNorm,
    config: ClipVisionConfig,
}

impl ClipVisionModel {
    /// `vb` points at the vision model (`vision_model.` in a `CLIPModel` file).
    pub fn new(vb: VarBuilder, config: &ClipVisionConfig) -> Result<Self> {
        let c = config;
        let emb = vb.pp("embeddings");
        let p = c.patch_size;
        let patch_weight = emb
            .get(
                (c.hidden_size, c.num_channels, p, p),
                "patch_embedding.weight",
            )?
            .reshape((c.hidden_size, c.num_channels * p * p))?;
        let class_embedding = emb.get(c.hidden_size, "class_embedding")?;
        let grid = c.image_size / p;
        let position_embedding = emb.get(
            (grid * grid + 1, c.hidden_size),
            "position_embedding.weight",
        )?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| EncoderLayer::new(vb.pp(format!("encoder.layers.{i}")), c.into()))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch_weight,
            class_embedding,
            position_embedding,
            pre_ln: LayerNorm::new(vb.pp("pre_layrnorm"), c.hidden_size, c.layer_norm_eps)?,
            layers,
            post_ln: LayerNorm::new(vb.pp("post_layernorm"), c.hidden_size, c.layer_norm_eps)?,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    /// `pixel_values: [B, C, S, S]` (already resized and normalised) → pooled `[B, hidden]`.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let (b, ch, h, w) = pixel_values.dims4()?;
        let p = c.patch_size;
        if ch != c.num_channels || h != c.image_size || w != c.image_size {
            candle_core::bail!(
                "CLIP vision expects [B, {}, {}, {}] pixels, got [{b}, {ch}, {h}, {w}]",
                c.num_channels,
                c.image_size,
                c.image_size
            );
        }
        let (gh, gw) = (h / p, w / p);
        // The stride-p, kernel-p patch convolution as one matmul over unfolded patches.
        let patches = pixel_values
            .reshape((b, ch, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, gh * gw, ch * p * p))?;
        let tokens = patches.broadcast_matmul(&self.patch_weight.t()?)?;
        let cls = self
            .class_embedding
            .reshape((1, 1, c.hidden_size))?
            .repeat((b, 1, 1))?;
        let x = Tensor::cat(&[&cls, &tokens], 1)?.broadcast_add(&self.position_embedding)?;
        let mut x = self.pre_ln.forward(&x)?;
        for layer in &self.layers {
            x = layer.forward(&x, false)?;
        }
        self.post_ln.forward(&x.narrow(1, 0, 1)?.squeeze(1)?)
    }
}

/// transformers' `CLIPModel`: both towers and their projections into the shared space.
#[derive(Debug, Clone)]
pub struct ClipModel {
    text: ClipTextModel,
    vision: ClipVisionModel,
    text_projection: Linear,
    visual_projection: Linear,
    config: ClipConfig,
}

impl ClipModel {
    pub fn new(vb: VarBuilder, config: &ClipConfig) -> Result<Self> {
        let text = ClipTextModel::new(vb.pp("text_model"), &config.text_config)?;
        let vision = ClipVisionModel::new(vb.pp("vision_model"), &config.vision_config)?;
        let d = config.projection_dim;
        Ok(Self {
            text,
            vision,
            text_projection: Linear::new(
                vb.pp("text_projection"),
                config.text_config.hidden_size,
                d,
                false,
            )?,
            visual_projection: Linear::new(
                vb.pp("visual_projection"),
                config.vision_config.hidden_size,
                d,
                false,
            )?,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    /// `input_ids: [B, T]` → projected, L2-normalised text embeddings `[B, projection_dim]`.
    pub fn text_embeds(&self, input_ids: &Tensor) -> Result<Tensor> {
        let hidden = self.text.forward(input_ids)?;
        let ids = input_ids.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        let eos = self.config.text_config.eos_token_id;
        let mut pooled = Vec::with_capacity(ids.len());
        for (i, row) in ids.iter().enumerate() {
            let pos = if eos == 2 {
                // transformers' legacy rule: the first position of the highest id.
                row.iter()
                    .enumerate()
                    .fold(
                        (0, i64::MIN),
                        |best, (j, &v)| if v > best.1 { (j, v) } else { best },
                    )
                    .0
            } else {
                row.iter()
                    .position(|&v| v == i64::from(eos))
                    .unwrap_or(row.len() - 1)
            };
            pooled.push(hidden.get(i)?.get(pos)?);
        }
        l2_normalize(&self.text_projection.forward(&Tensor::stack(&pooled, 0)?)?)
    }

    /// `pixel_values: [B, 3, S, S]` → projected, L2-normalised image embeddings.
    pub fn image_embeds(&self, pixel_values: &Tensor) -> Result<Tensor> {
        l2_normalize(
            &self
                .visual_projection
                .forward(&self.vision.forward(pixel_values)?)?,
        )
    }

    pub fn vision(&self) -> &ClipVisionModel {
        &self.vision
    }
}

/// Divides every row of `[B, D]` by its L2 norm.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(1)?.sqrt()?)
}
