//! InstructPix2Pix training data, as the paper made it: an LLM writes an edit instruction and
//! the edited caption for each caption; Stable Diffusion renders both captions from one seed with
//! Prompt-to-Prompt; CLIP filters the pairs; the rows go to Parquet shards that `datasets`,
//! diffusers' `train_instruct_pix2pix.py` and `ip2p train` read as they are.

pub mod error;
pub mod fsutil;
pub mod input;
pub mod llm;
pub mod mock_llm;
pub mod output;
pub mod render;
pub mod retry;
pub mod run;
pub mod world;

pub use error::{Error, Result};
