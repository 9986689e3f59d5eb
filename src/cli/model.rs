//! The model flags every inference command shares, and loading the pipeline they name.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use ip2p::device::{self, DeviceChoice, DeviceList};
use ip2p::loader::{self, HubOptions, LoadOptions, ModelDir, Variant};
use ip2p::models::nn::Kernels;
use ip2p::pipeline::EditPipeline;

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A diffusers folder or a Hugging Face hub id (e.g. timbrooks/instruct-pix2pix). Without
    /// it: flowers-ip2p, the small flower-world model shipped in the repository's models/.
    #[arg(long, env = "IP2P_MODEL", default_value = ip2p::loader::BUILTIN_MODEL)]
    pub model: String,
    /// Weight files to use: auto (full precision if present, else fp16), fp32, fp16.
    #[arg(long, env = "IP2P_VARIANT", default_value = "auto")]
    pub variant: Variant,
    /// auto (the first CUDA device if the build has CUDA and one can be opened, else the CPU),
    /// cpu, cuda, cuda:N. `serve` takes a list (cuda:0,cuda:1): one model worker per device.
    #[arg(long, env = "IP2P_DEVICE", default_value = "auto")]
    pub device: DeviceList,
    /// What the networks compute in: auto (f32 on the CPU, f16 on a GPU), f32, f16, bf16.
    #[arg(long, env = "IP2P_DTYPE", default_value = "auto")]
    pub dtype: DTypeChoice,
    /// auto (the fused CPU kernels where they apply) or generic (candle's ops only: the graph
    /// a GPU runs, on any device).
    #[arg(long, env = "IP2P_KERNELS", default_value = "auto")]
    pub kernels: Kernels,
    /// Use only the local Hugging Face cache (also HF_HUB_OFFLINE=1).
    #[arg(long, env = "IP2P_OFFLINE")]
    pub offline: bool,
    /// A LoRA file and its scale, FILE[:SCALE] (diffusers/PEFT or kohya/A1111; repeatable,
    /// comma-separated in the variable): added to the UNet's and text encoder's weights at load.
    #[arg(long, env = "IP2P_LORA", value_delimiter = ',')]
    pub lora: Vec<ip2p::loader::lora::LoraSpec>,
    /// A Textual Inversion embedding, FILE[:TOKEN] (A1111 .pt/.safetensors or diffusers;
    /// repeatable, comma-separated in the variable): its trigger word (the file's own unless
    /// given) can then be used in instructions.
    #[arg(long, env = "IP2P_EMBEDDING", value_delimiter = ',')]
    pub embedding: Vec<ip2p::loader::embeddings::EmbeddingSpec>,
    /// An A1111 hypernetwork, FILE[:STRENGTH], applied to the UNet's attention layers.
    #[arg(long, env = "IP2P_HYPERNETWORK")]
    pub hypernetwork: Option<ip2p::loader::hypernetwork::HypernetworkSpec>,
    /// A folder for caches of packed weights (CPU): the first start writes them (about 5 GB
    /// for SD 1.5), later starts map them instead of packing. Off when not given.
    #[arg(long, env = "IP2P_PACKED_CACHE")]
    pub packed_cache: Option<PathBuf>,
}

impl ModelArgs {
    /// The pipeline on the one device named (a list is for `serve`).
    pub fn load_pipeline(&self) -> Result<EditPipeline> {
        if self.device.0.len() > 1 {
            anyhow::bail!("an edit runs on one device; a list is for `ip2p serve`");
        }
        self.load_pipeline_on(self.device.first())
    }

    /// The pipeline on `device`.
    pub fn load_pipeline_on(&self, device: DeviceChoice) -> Result<EditPipeline> {
        let dev = device::open(device)?;
        let hub = HubOptions {
            offline: self.offline,
            fp16: self.variant == Variant::Fp16,
            ..Default::default()
        };
        let dir = ModelDir::open(&self.model, &hub)?;
        tracing::info!(model = %dir.root().display(), device = ?dev, "loading");
        let opts = LoadOptions {
            variant: self.variant,
            packed_cache: self.packed_cache.clone(),
            dtype: self.dtype.0,
            kernels: self.kernels,
            loras: self.lora.clone(),
            embeddings: self.embedding.clone(),
            hypernetwork: self.hypernetwork.clone(),
            ..Default::default()
        };
        Ok(EditPipeline::new(loader::load(&dir, &dev, &opts)?)?)
    }
}

/// `--dtype`: `auto` (the device's), `f32`, `f16`, `bf16`.
#[derive(Debug, Clone, Copy)]
pub struct DTypeChoice(pub Option<candle_core::DType>);

impl std::str::FromStr for DTypeChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        use candle_core::DType;
        Ok(Self(match s {
            "auto" => None,
            "f32" | "fp32" => Some(DType::F32),
            "f16" | "fp16" => Some(DType::F16),
            "bf16" => Some(DType::BF16),
            _ => return Err(format!("unknown dtype `{s}` (auto, f32, f16, bf16)")),
        }))
    }
}
