//! CLIP text encoder (transformers' `CLIPTextModel`): the last hidden state after the final
//! layer norm is what Stable Diffusion conditions on.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;

use super::nn::{self, LayerNorm, Linear};

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
}

impl Attention {
    fn new(vb: VarBuilder, c: &ClipTextConfig) -> Result<Self> {
        let h = c.hidden_size;
        Ok(Self {
            q: Linear::new(vb.pp("q_proj"), h, h, true)?,
            k: Linear::new(vb.pp("k_proj"), h, h, true)?,
            v: Linear::new(vb.pp("v_proj"), h, h, true)?,
            out: Linear::new(vb.pp("out_proj"), h, h, true)?,
            heads: c.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let q = self.q.forward(x)?;
        let k = self.k.forward(x)?;
        let v = self.v.forward(x)?;
        let o = nn::attention(&q, &k, &v, self.heads, Some(mask))?;
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
    fn new(vb: VarBuilder, c: &ClipTextConfig) -> Result<Self> {
        Ok(Self {
            ln1: LayerNorm::new(vb.pp("layer_norm1"), c.hidden_size, c.layer_norm_eps)?,
            attn: Attention::new(vb.pp("self_attn"), c)?,
            ln2: LayerNorm::new(vb.pp("layer_norm2"), c.hidden_size, c.layer_norm_eps)?,
            fc1: Linear::new(vb.pp("mlp.fc1"), c.hidden_size, c.intermediate_size, true)?,
            fc2: Linear::new(vb.pp("mlp.fc2"), c.intermediate_size, c.hidden_size, true)?,
            act: c.hidden_act,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = (x + self.attn.forward(&self.ln1.forward(x)?, mask)?)?;
        let m = self.fc1.forward(&self.ln2.forward(&h)?)?;
        let m = match self.act {
            Activation::QuickGelu => nn::quick_gelu(&m)?,
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
            .map(|i| EncoderLayer::new(vb.pp(format!("encoder.layers.{i}")), c))
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
        let mask = causal_mask(t, x.dtype(), x.device())?;
        for layer in &self.layers {
            x = layer.forward(&x, &mask)?;
        }
        self.final_ln.forward(&x)
    }
}

fn causal_mask(t: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(v, (t, t), device)?.to_dtype(dtype)
}
