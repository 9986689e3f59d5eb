//! The `ip2p` binary's doors: flags (every one also an environment variable) and what each
//! subcommand does with the library. Argument structs convert into the library's own
//! configuration types here; nothing below this module does tensor math.

mod assemble;
mod bench;
mod edit;
mod model;
mod progress;
mod serve;
mod steps;
mod train;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "ip2p",
    version,
    about = "InstructPix2Pix in Rust: edit an image from a written instruction"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log lines as text (coloured only on a terminal; NO_COLOR turns colour off) or json
    /// (one object per line).
    #[arg(long, global = true, env = "IP2P_LOG_FORMAT", default_value = "text")]
    pub log_format: ip2p::logging::LogFormat,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Edit an image: `ip2p edit --model timbrooks/instruct-pix2pix in.jpg "make it winter" -o out.png`,
    /// or through a server with `--server http://127.0.0.1:50051`.
    Edit(edit::EditArgs),
    /// Serve edits over gRPC, gRPC-Web and HTTP on one port.
    Serve(serve::ServeArgs),
    /// Time the networks at full SD 1.5 shapes with random weights (JSON lines).
    Bench(bench::BenchArgs),
    /// Make an InstructPix2Pix starting point from a Stable Diffusion model (8-channel UNet).
    Extend(train::ExtendArgs),
    /// Fine-tune an 8-channel UNet on (input image, instruction, edited image) Parquet rows.
    Train(train::TrainArgs),
    /// Train a VAE of any widths on a dataset's pictures (diffusers `vae/` folder out).
    TrainVae(train::TrainVaeArgs),
    /// Learn a Textual Inversion word from a few pictures, the model frozen
    /// (`ip2p train-embedding --model sd15 --images cat-toy/ --token "<cat-toy>" --initializer toy -o out`).
    TrainEmbedding(train::TrainEmbeddingArgs),
    /// A new model folder: another's tokenizer and text encoder, a trained VAE, a fresh UNet.
    Assemble(assemble::AssembleArgs),
    /// A shippable copy of a model folder with fp16 weights.
    Package(assemble::PackageArgs),
    /// A single-file checkpoint (LDM `.ckpt` / `.safetensors`, A1111/ComfyUI) as a diffusers
    /// folder: `ip2p convert instruct-pix2pix-00-22000.ckpt ip2p-folder`.
    Convert(assemble::ConvertArgs),
    /// Merge checkpoints as A1111's merger: weighted sum or add difference
    /// (`ip2p merge ip2p-folder dreambooth-folder sd15-folder --mode add-difference --alpha 1 -o out`).
    Merge(assemble::MergeArgs),
    /// How few denoising steps keep the picture, per scheduler, against each one's 100-step
    /// result (`ip2p steps photo.jpg "make it winter"`).
    Steps(steps::StepsArgs),
}

impl Cli {
    /// Serving and training log at `info`; one-shot commands only warn.
    pub fn long_running(&self) -> bool {
        matches!(
            self.command,
            Command::Serve(_)
                | Command::Train(_)
                | Command::TrainVae(_)
                | Command::TrainEmbedding(_)
        )
    }
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Edit(a) => edit::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Bench(a) => bench::run(&a.try_into()?).map_err(Into::into),
        Command::Extend(a) => train::extend(a),
        Command::Train(a) => train::run(a),
        Command::TrainVae(a) => train::run_vae(a),
        Command::TrainEmbedding(a) => train::run_embedding(a),
        Command::Assemble(a) => assemble::run(a),
        Command::Package(a) => assemble::package(a),
        Command::Convert(a) => assemble::convert(a),
        Command::Merge(a) => assemble::merge(a),
        Command::Steps(a) => steps::run(a),
    }
}
