//! # ip2p — InstructPix2Pix in Rust
//!
//! Edit an image from a written instruction with exactly the math of the reference
//! (diffusers' `StableDiffusionInstructPix2PixPipeline`), on candle.
//!
//! * [`models`]: CLIP text encoder, VAE, UNet2DConditionModel, CLIP tokenizer.
//! * [`schedulers`]: Euler ancestral, Euler, DDIM, DPM++ 2M, and the [`schedulers::NoiseSource`]
//!   every random draw goes through.
//! * [`loader`]: diffusers folders, safetensors (fp16 variants), legacy key names, the hub cache.
//! * [`pipeline`]: the edit pipeline with dual classifier-free guidance, text-to-image, image I/O.
//! * `server` (feature `server`): the gRPC, gRPC-Web and HTTP service and its client.
//! * `training` (feature `train`): fine-tuning the 8-channel UNet, LoRA, `extend`.
//! * `logging` (feature `cli`): log set-up for command-line programs.
//!
//! The CPU kernels are the `ip2p-cpu` crate; `docs/architecture.md` draws the whole tree.

#![doc = include_str!("../README.md")]
// The compute kernels' `unsafe` lives in the `ip2p-cpu` crate. Here only two named exceptions:
// mapping checkpoint files (`loader::map`) and glibc's allocator policy
// (`device::tune_allocator`).
#![deny(unsafe_code)]

pub mod device;
pub mod error;
pub mod fsutil;
pub mod loader;
#[cfg(feature = "cli")]
pub mod logging;
pub mod models;
pub mod pipeline;
pub mod schedulers;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "train")]
pub mod training;

pub use error::{Error, Result};
