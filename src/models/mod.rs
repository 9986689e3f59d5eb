//! The networks, written for this project on candle: one file per part, as diffusers splits them.
//!
//! Every model follows the same shape: a config struct (deserialised from the checkpoint's
//! `config.json`), a constructor taking a [`candle_nn::VarBuilder`], and a plain `forward`.

pub mod clip;
pub mod kernels;
pub mod nn;
pub mod profile;
pub mod resnet;
pub mod sgemm;
pub mod stored;
pub mod tokenizer;
pub mod unet;
pub mod vae;

pub use clip::{
    ClipConfig, ClipModel, ClipTextConfig, ClipTextModel, ClipVisionConfig, ClipVisionModel,
};
pub use tokenizer::{ClipTokenizer, Tokenized};
pub use unet::{UNet2DConditionModel, UNetConfig};
pub use vae::{AutoencoderKL, VaeConfig};
