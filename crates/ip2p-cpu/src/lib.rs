//! # ip2p-cpu — the CPU compute backend of ip2p
//!
//! The kernels the models run on a CPU in f32, each a safe function or a candle `CustomOp`
//! over plain slices; every `unsafe` block of the project's compute lives here, with its
//! SAFETY note. `ip2p::models::nn` is the dispatch layer that picks these or candle's own ops.
//!
//! * [`sgemm`]: the matrix product (AVX-512 / AVX2 micro-kernels, packed operands, epilogues).
//! * [`kernels`]: convolutions (direct and shifted 3×3, stride 2, Winograd, narrow, 1×1),
//!   linear layers, fused attention, element-wise activations and their SIMD dispatch.
//! * [`rows`]: LayerNorm, GroupNorm (+SiLU) and the batched transpose.
//! * [`grad`]: convolution for training (forward and both gradients on the GEMM).
//! * [`stored`]: weights read straight from a checkpoint's bytes, and the packed-weight cache.
//! * [`host`]: the CPU (vendor, model, SIMD features, caches), read once.
//! * [`profile`]: per-kernel time and FLOP counters (`IP2P_PROFILE`).

pub mod grad;
pub mod host;
pub mod kernels;
pub mod profile;
pub mod rows;
pub mod sgemm;
pub mod stored;
