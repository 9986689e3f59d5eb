//! `ip2p`: edit images from written instructions.

use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use ip2p::device::{self, DeviceChoice};
use ip2p::loader::{self, HubOptions, LoadOptions, ModelDir, Variant};
use ip2p::pipeline::{image as img, Control, EditParams, EditPipeline, ResizePolicy, StepInfo};
use ip2p::schedulers::SchedulerKind;

#[derive(Parser, Debug)]
#[command(
    name = "ip2p",
    version,
    about = "InstructPix2Pix in Rust: edit an image from a written instruction"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Edit an image: `ip2p edit --model timbrooks/instruct-pix2pix in.jpg "make it winter" -o out.png`.
    Edit(EditArgs),
}

#[derive(Args, Debug, Clone)]
struct ModelArgs {
    /// A diffusers folder or a Hugging Face hub id (e.g. timbrooks/instruct-pix2pix).
    #[arg(long, env = "IP2P_MODEL", default_value = "timbrooks/instruct-pix2pix")]
    model: String,
    /// Weight files to use: auto (full precision if present, else fp16), fp32, fp16.
    #[arg(long, env = "IP2P_VARIANT", default_value = "auto")]
    variant: Variant,
    /// auto, cpu, cuda, cuda:N.
    #[arg(long, env = "IP2P_DEVICE", default_value = "auto")]
    device: DeviceChoice,
    /// Use only the local Hugging Face cache (also HF_HUB_OFFLINE=1).
    #[arg(long, env = "IP2P_OFFLINE")]
    offline: bool,
}

#[derive(Args, Debug)]
struct EditArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The image to edit (PNG, JPEG, WebP, ...).
    #[arg(env = "IP2P_INPUT")]
    input: PathBuf,
    /// What to change, e.g. "turn the sunflowers into roses".
    #[arg(env = "IP2P_INSTRUCTION")]
    instruction: String,
    /// Where to write the result (format from the extension).
    #[arg(short, long, env = "IP2P_OUTPUT", default_value = "edited.png")]
    output: PathBuf,
    #[arg(long, env = "IP2P_STEPS", default_value_t = 100)]
    steps: usize,
    /// How strongly to follow the instruction (s_T).
    #[arg(long, env = "IP2P_TEXT_GUIDANCE", default_value_t = 7.5)]
    text_guidance: f64,
    /// How strongly to stay close to the input (s_I).
    #[arg(long, env = "IP2P_IMAGE_GUIDANCE", default_value_t = 1.5)]
    image_guidance: f64,
    /// Random seed (printed when not given).
    #[arg(long, env = "IP2P_SEED")]
    seed: Option<u64>,
    /// euler_a, euler, ddim, dpmpp_2m, dpmpp_2m_karras (default: the model's own).
    #[arg(long, env = "IP2P_SCHEDULER")]
    scheduler: Option<SchedulerKind>,
    /// Long side the model works at (paper policy).
    #[arg(long, env = "IP2P_RESOLUTION", default_value_t = 512)]
    resolution: u32,
    /// paper (sides multiples of 64, long side ≈ resolution) or native (floor to multiples of 8).
    #[arg(long, env = "IP2P_RESIZE", default_value = "paper")]
    resize: ResizePolicy,
    /// Negative prompt, used as the unconditional text.
    #[arg(long, env = "IP2P_NEGATIVE", default_value = "")]
    negative: String,
    /// Write the working-resolution image instead of resizing back to the input's size.
    #[arg(long, env = "IP2P_KEEP_WORKING_SIZE")]
    keep_working_size: bool,
}

fn random_seed() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() >> 11
}

fn save(image: &image::DynamicImage, path: &Path) -> Result<()> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let image = if matches!(ext.as_str(), "jpg" | "jpeg") {
        image::DynamicImage::ImageRgb8(image.to_rgb8())
    } else {
        image.clone()
    };
    image
        .save(path)
        .with_context(|| format!("writing {}", path.display()))
}

fn load_pipeline(m: &ModelArgs) -> Result<EditPipeline> {
    let dev = device::open(m.device)?;
    let hub = HubOptions {
        offline: m.offline,
        fp16: m.variant == Variant::Fp16,
        ..Default::default()
    };
    let dir = ModelDir::open(&m.model, &hub)?;
    tracing::info!(model = %dir.root().display(), device = ?dev, "loading");
    let opts = LoadOptions {
        variant: m.variant,
        ..Default::default()
    };
    let components = loader::load(&dir, &dev, &opts)?;
    Ok(EditPipeline::new(components)?)
}

fn edit(a: EditArgs) -> Result<()> {
    let seed = a.seed.unwrap_or_else(random_seed);
    let params = EditParams {
        instruction: a.instruction.clone(),
        negative_prompt: a.negative.clone(),
        steps: a.steps,
        text_guidance: a.text_guidance,
        image_guidance: a.image_guidance,
        scheduler: a.scheduler,
        seed,
        resolution: a.resolution,
        resize: a.resize,
        keep_working_size: a.keep_working_size,
    };
    params.validate()?;
    let input = img::open(&a.input, &img::DecodeLimits::default())?;
    let pipe = load_pipeline(&a.model)?;
    let bar = ProgressBar::new(a.steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} denoising [{bar:40}] {pos}/{len} steps, {elapsed} (eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let mut progress = |i: &StepInfo<'_>| {
        bar.set_position(i.step as u64);
        Control::Continue
    };
    let out = pipe.edit(&input, &params, &mut progress)?;
    bar.finish_and_clear();
    if out.truncated_tokens > 0 {
        eprintln!(
            "warning: the instruction was {} tokens too long for CLIP's 77 and was truncated",
            out.truncated_tokens
        );
    }
    save(&out.image, &a.output)?;
    println!(
        "wrote {} ({}x{}, worked at {}x{}) seed {} scheduler {} steps {} | encode {:.2}s denoise {:.2}s decode {:.2}s",
        a.output.display(),
        out.image.width(),
        out.image.height(),
        out.working_size.0,
        out.working_size.1,
        out.seed,
        out.scheduler,
        a.steps,
        out.timings.encode.as_secs_f64(),
        out.timings.denoise.as_secs_f64(),
        out.timings.decode.as_secs_f64(),
    );
    Ok(())
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Edit(a) => edit(a),
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
