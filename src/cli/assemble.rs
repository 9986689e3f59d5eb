//! `ip2p assemble` and `ip2p package`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use ip2p::training::assemble::{assemble, package_half, AssembleConfig};

#[derive(Args, Debug)]
pub struct AssembleArgs {
    /// The folder whose tokenizer, text encoder, scheduler and model_index.json are taken.
    #[arg(long, env = "IP2P_ASSEMBLE_TEXT_FROM")]
    pub text_from: PathBuf,
    /// A trained diffusers `vae/` folder (e.g. `ip2p train-vae`'s `final/vae`).
    #[arg(long, env = "IP2P_ASSEMBLE_VAE")]
    pub vae: PathBuf,
    /// The UNet's diffusers config.json (8 input channels); its weights are drawn fresh.
    #[arg(long, env = "IP2P_ASSEMBLE_UNET_CONFIG")]
    pub unet_config: PathBuf,
    /// Parquet files or folders whose pictures set the VAE's scaling factor.
    #[arg(
        long,
        env = "IP2P_ASSEMBLE_DATA",
        required = true,
        value_delimiter = ','
    )]
    pub data: Vec<PathBuf>,
    /// Rows measured for the scaling factor (both pictures of each).
    #[arg(long, env = "IP2P_ASSEMBLE_SCALE_ROWS", default_value_t = 64)]
    pub scale_rows: usize,
    #[arg(long, env = "IP2P_ASSEMBLE_SEED", default_value_t = 42)]
    pub seed: u64,
    /// The new model folder.
    #[arg(long, env = "IP2P_ASSEMBLE_OUT")]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct PackageArgs {
    /// A model folder (e.g. `ip2p train`'s `final`).
    #[arg(env = "IP2P_PACKAGE_FROM")]
    pub from: PathBuf,
    /// The copy, every weight file as its fp16 variant.
    #[arg(env = "IP2P_PACKAGE_OUT")]
    pub out: PathBuf,
}

/// `ip2p assemble`.
pub fn run(a: AssembleArgs) -> Result<()> {
    let scale = assemble(&AssembleConfig {
        text_from: a.text_from,
        vae: a.vae,
        unet_config: a.unet_config,
        data: a.data,
        columns: Default::default(),
        scale_rows: a.scale_rows,
        seed: a.seed,
        out: a.out.clone(),
    })?;
    println!(
        "{}: fresh UNet, VAE scaling factor {scale:.5}",
        a.out.display()
    );
    Ok(())
}

/// `ip2p package`.
pub fn package(a: PackageArgs) -> Result<()> {
    package_half(&a.from, &a.out)?;
    println!("{}: fp16 copy of {}", a.out.display(), a.from.display());
    Ok(())
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// The single file: LDM `.ckpt` or `.safetensors` (UNet, VAE and CLIP text encoder).
    #[arg(env = "IP2P_CONVERT_FROM")]
    pub file: PathBuf,
    /// The diffusers folder to write.
    #[arg(env = "IP2P_CONVERT_OUT")]
    pub out: PathBuf,
    /// A diffusers folder or hub id whose configurations, tokenizer and scheduler to use
    /// (default: inferred from the shapes, SD 1.x defaults; the tokenizer of
    /// openai/clip-vit-large-patch14 from the hub cache).
    #[arg(long, env = "IP2P_CONVERT_CONFIG_FROM")]
    pub config_from: Option<String>,
    /// Use only the local Hugging Face cache.
    #[arg(long, env = "IP2P_OFFLINE")]
    pub offline: bool,
}

/// `ip2p convert`.
pub fn convert(a: ConvertArgs) -> Result<()> {
    let opts = ip2p::loader::single_file::ConvertOptions {
        config_from: a.config_from,
        hub: ip2p::loader::HubOptions {
            offline: a.offline,
            ..Default::default()
        },
    };
    ip2p::loader::single_file::convert(&a.file, &a.out, &opts)?;
    println!(
        "{}: diffusers folder of {}",
        a.out.display(),
        a.file.display()
    );
    Ok(())
}

/// `--mode` of `ip2p merge`.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum MergeModeArg {
    /// A·(1 − α) + B·α.
    WeightedSum,
    /// A + α·(B − C).
    AddDifference,
}

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// Model A (a diffusers folder, hub id or single file): the result keeps its configs.
    #[arg(env = "IP2P_MERGE_A")]
    pub a: String,
    /// Model B.
    #[arg(env = "IP2P_MERGE_B")]
    pub b: String,
    /// Model C (add-difference only), e.g. the base B was fine-tuned from.
    #[arg(env = "IP2P_MERGE_C")]
    pub c: Option<String>,
    /// Where the merged diffusers folder goes.
    #[arg(long, short, env = "IP2P_MERGE_OUT")]
    pub out: PathBuf,
    #[arg(
        long,
        value_enum,
        env = "IP2P_MERGE_MODE",
        default_value = "weighted-sum"
    )]
    pub mode: MergeModeArg,
    /// α: B's weight (weighted sum) or the difference's (add difference).
    #[arg(long, env = "IP2P_MERGE_ALPHA", default_value_t = 0.5)]
    pub alpha: f64,
    /// Write fp16 weights.
    #[arg(long, env = "IP2P_MERGE_HALF")]
    pub half: bool,
    /// Use only the local Hugging Face cache.
    #[arg(long, env = "IP2P_OFFLINE")]
    pub offline: bool,
}

/// `ip2p merge`.
pub fn merge(a: MergeArgs) -> Result<()> {
    use ip2p::training::merge::{merge, MergeMode, MergeOptions};
    let hub = ip2p::loader::HubOptions {
        offline: a.offline,
        ..Default::default()
    };
    let open = |s: &str| ip2p::loader::ModelDir::open(s, &hub);
    let c = a.c.as_deref().map(open).transpose()?;
    let opts = MergeOptions {
        mode: match a.mode {
            MergeModeArg::WeightedSum => MergeMode::WeightedSum,
            MergeModeArg::AddDifference => MergeMode::AddDifference,
        },
        alpha: a.alpha,
        half: a.half,
    };
    let r = merge(&open(&a.a)?, &open(&a.b)?, c.as_ref(), opts, &a.out)?;
    println!(
        "{}: {} tensors merged, {} kept from A{}",
        a.out.display(),
        r.merged,
        r.kept_from_a,
        if r.partial_conv_in {
            " (conv_in: its first 4 input channels; the image channels are A's)"
        } else {
            ""
        }
    );
    Ok(())
}
