//! The networks, written for this project on candle: one file per part, as diffusers splits them.
//! Their layers go through [`nn`], the dispatch layer that runs a fused kernel of the CPU
//! backend (the `ip2p-cpu` crate) where one applies and candle's own ops elsewhere.
//!
//! Every model follows the same shape: a config struct (deserialised from the checkpoint's
//! `config.json`), a constructor taking a [`candle_nn::VarBuilder`], and a plain `forward`.

pub mod clip;
pub mod nn;
pub mod resnet;
pub mod tokenizer;
pub mod unet;
pub mod vae;

pub use clip::{
    ClipConfig, ClipModel, ClipTextConfig, ClipTextModel, ClipVisionConfig, ClipVisionModel,
};
pub use tokenizer::{ClipTokenizer, Tokenized};
pub use unet::{UNet2DConditionModel, UNetConfig};
pub use vae::{AutoencoderKL, VaeConfig};
