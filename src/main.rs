//! `ip2p`: edit images from written instructions.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use ip2p::device::{self, DeviceChoice, DeviceList};
use ip2p::loader::{self, HubOptions, LoadOptions, ModelDir, Variant};
use ip2p::models::nn::Kernels;
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
    /// Log lines as text (coloured only on a terminal; NO_COLOR turns colour off) or json
    /// (one object per line).
    #[arg(long, global = true, env = "IP2P_LOG_FORMAT", default_value = "text")]
    log_format: ip2p::logging::LogFormat,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Edit an image: `ip2p edit --model timbrooks/instruct-pix2pix in.jpg "make it winter" -o out.png`,
    /// or through a server with `--server http://127.0.0.1:50051`.
    Edit(EditArgs),
    /// Serve edits over gRPC, gRPC-Web and HTTP on one port.
    Serve(ServeArgs),
    /// Time the networks at full SD 1.5 shapes with random weights (JSON lines).
    Bench(BenchArgs),
    /// Make an InstructPix2Pix starting point from a Stable Diffusion model (8-channel UNet).
    Extend(ExtendArgs),
    /// Fine-tune an 8-channel UNet on (input image, instruction, edited image) Parquet rows.
    Train(TrainArgs),
}

#[derive(Args, Debug)]
struct ExtendArgs {
    /// A Stable Diffusion 1.x folder or hub id.
    #[arg(long, env = "IP2P_EXTEND_FROM")]
    from: String,
    /// The new folder.
    #[arg(long, env = "IP2P_EXTEND_OUT")]
    out: PathBuf,
    /// Never download (also HF_HUB_OFFLINE=1).
    #[arg(long, env = "IP2P_OFFLINE")]
    offline: bool,
}

#[derive(Args, Debug)]
struct TrainArgs {
    /// An InstructPix2Pix folder (see `ip2p extend`) or hub id.
    #[arg(long, env = "IP2P_MODEL")]
    model: String,
    /// Parquet files or folders (dataset-gen's output, or the published datasets' layout).
    #[arg(long, env = "IP2P_TRAIN_DATA", required = true, value_delimiter = ',')]
    data: Vec<PathBuf>,
    /// Checkpoints, the loss log and the final model go here.
    #[arg(long, env = "IP2P_TRAIN_OUT")]
    out: PathBuf,
    #[arg(long, env = "IP2P_TRAIN_RESOLUTION", default_value_t = 256)]
    resolution: u32,
    #[arg(long, env = "IP2P_TRAIN_BATCH_SIZE", default_value_t = 4)]
    batch_size: usize,
    #[arg(long, env = "IP2P_TRAIN_GRAD_ACCUM", default_value_t = 1)]
    grad_accum: usize,
    /// Optimisation steps in total.
    #[arg(long, env = "IP2P_TRAIN_STEPS", default_value_t = 1000)]
    steps: u64,
    #[arg(long, env = "IP2P_TRAIN_LR", default_value_t = 1e-4)]
    lr: f64,
    #[arg(long, env = "IP2P_TRAIN_WEIGHT_DECAY", default_value_t = 1e-2)]
    weight_decay: f64,
    /// Clip the global gradient norm (0: off).
    #[arg(long, env = "IP2P_TRAIN_MAX_GRAD_NORM", default_value_t = 1.0)]
    max_grad_norm: f64,
    /// EMA decay of the weights (0: no EMA).
    #[arg(long, env = "IP2P_TRAIN_EMA", default_value_t = 0.9999)]
    ema: f64,
    #[arg(long, env = "IP2P_TRAIN_CHECKPOINT_EVERY", default_value_t = 500)]
    checkpoint_every: u64,
    #[arg(long, env = "IP2P_TRAIN_SEED", default_value_t = 42)]
    seed: u64,
    /// Centre crops instead of random ones.
    #[arg(long, env = "IP2P_TRAIN_CENTER_CROP")]
    center_crop: bool,
    /// No horizontal flips.
    #[arg(long, env = "IP2P_TRAIN_NO_FLIP")]
    no_flip: bool,
    /// p of the conditioning dropout (text dropped below 2p, image between p and 3p).
    #[arg(long, env = "IP2P_TRAIN_CONDITIONING_DROPOUT", default_value_t = 0.05)]
    conditioning_dropout: f64,
    /// Continue from the newest checkpoint in --out.
    #[arg(long, env = "IP2P_TRAIN_RESUME")]
    resume: bool,
    /// Train LoRA adapters of this rank on the attention projections instead of the whole UNet.
    #[arg(long, env = "IP2P_TRAIN_LORA_RANK")]
    lora_rank: Option<usize>,
    /// LoRA alpha (scale = alpha / rank; default: the rank).
    #[arg(long, env = "IP2P_TRAIN_LORA_ALPHA")]
    lora_alpha: Option<f64>,
    /// Edit --sample-image with --sample-instruction every N steps (into <out>/samples/).
    #[arg(long, env = "IP2P_TRAIN_SAMPLE_EVERY")]
    sample_every: Option<u64>,
    #[arg(long, env = "IP2P_TRAIN_SAMPLE_IMAGE")]
    sample_image: Option<PathBuf>,
    #[arg(
        long,
        env = "IP2P_TRAIN_SAMPLE_INSTRUCTION",
        default_value = "make it look like a watercolor"
    )]
    sample_instruction: String,
    #[arg(long, env = "IP2P_TRAIN_SAMPLE_STEPS", default_value_t = 20)]
    sample_steps: usize,
    /// Column names.
    #[arg(
        long,
        env = "IP2P_TRAIN_ORIGINAL_IMAGE_COLUMN",
        default_value = "original_image"
    )]
    original_image_column: String,
    #[arg(
        long,
        env = "IP2P_TRAIN_EDITED_IMAGE_COLUMN",
        default_value = "edited_image"
    )]
    edited_image_column: String,
    #[arg(
        long,
        env = "IP2P_TRAIN_EDIT_PROMPT_COLUMN",
        default_value = "edit_prompt"
    )]
    edit_prompt_column: String,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, env = "IP2P_DEVICE", default_value = "auto")]
    device: ip2p::device::DeviceChoice,
    #[arg(long, env = "IP2P_OFFLINE")]
    offline: bool,
}

fn extend(a: ExtendArgs) -> Result<()> {
    let hub = ip2p::loader::HubOptions {
        offline: a.offline,
        ..Default::default()
    };
    let dir = ip2p::loader::ModelDir::open(&a.from, &hub)?;
    ip2p::training::extend::extend(&dir, &a.out)?;
    println!("{}: UNet extended to 8 input channels", a.out.display());
    Ok(())
}

fn train(a: TrainArgs) -> Result<()> {
    use ip2p::training::trainer::{train, TrainConfig};
    let cfg = TrainConfig {
        model: a.model,
        hub: ip2p::loader::HubOptions {
            offline: a.offline,
            ..Default::default()
        },
        data: a.data,
        columns: ip2p::training::data::Columns {
            original_image: a.original_image_column,
            edited_image: a.edited_image_column,
            edit_prompt: a.edit_prompt_column,
        },
        out: a.out,
        resolution: a.resolution,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        steps: a.steps,
        adam: ip2p::training::adamw::AdamWConfig {
            lr: a.lr,
            weight_decay: a.weight_decay,
            ..Default::default()
        },
        max_grad_norm: a.max_grad_norm,
        ema: (a.ema > 0.0).then_some(a.ema),
        checkpoint_every: a.checkpoint_every,
        seed: a.seed,
        center_crop: a.center_crop,
        random_flip: !a.no_flip,
        conditioning_dropout: a.conditioning_dropout,
        prefetch: 2,
        resume: a.resume,
        lora: a.lora_rank.map(|rank| ip2p::training::lora::LoraConfig {
            rank,
            alpha: a.lora_alpha.unwrap_or(rank as f64),
        }),
        samples: match (a.sample_every, a.sample_image) {
            (Some(every), Some(image)) => Some(ip2p::training::trainer::SampleEdits {
                every,
                image,
                instruction: a.sample_instruction,
                steps: a.sample_steps,
                seed: a.seed,
            }),
            (Some(_), None) => anyhow::bail!("--sample-every needs --sample-image"),
            _ => None,
        },
        device: ip2p::device::open(a.device)?,
    };
    let bar = indicatif::ProgressBar::new(cfg.steps);
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} eta {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let s = train(&cfg, &mut |l| {
        bar.set_position(l.step);
        bar.set_message(format!("loss {:.4}", l.loss));
        if bar.is_hidden() && (l.step % 10 == 0 || l.step == 1) {
            tracing::info!(
                step = l.step,
                loss = l.loss,
                grad_norm = l.grad_norm,
                seconds = l.seconds,
                "train"
            );
        }
    })?;
    bar.finish();
    println!(
        "steps {}..{}: loss {:.4} -> {:.4}; model in {}",
        s.start_step,
        s.end_step,
        s.first_loss.unwrap_or(f64::NAN),
        s.last_loss.unwrap_or(f64::NAN),
        s.final_model.display()
    );
    Ok(())
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// A folder of full-size configs (unet/, vae/, text_encoder/).
    #[arg(
        long,
        env = "IP2P_BENCH_SHAPES",
        default_value = "../shared/fixtures/sd15-shapes"
    )]
    shapes: PathBuf,
    /// Image sides to time the UNet and VAE at.
    #[arg(long, env = "IP2P_BENCH_RES", default_values_t = [256usize, 512], num_args = 1..)]
    res: Vec<usize>,
    /// Timed runs after one warm-up; the median is printed.
    #[arg(long, env = "IP2P_BENCH_REPS", default_value_t = 3)]
    reps: usize,
    /// Only these parts (comma-separated): text, unet, vae (the default set); edit (a whole
    /// edit at each --res), load (start-to-ready from full-size f16 and f32 files; load_f16 or
    /// load_f32 for one of them), gemm,
    /// train_full, train_lora.
    #[arg(long, env = "IP2P_BENCH_ONLY", value_delimiter = ',')]
    only: Vec<String>,
    /// Denoising steps of the `edit` figure.
    #[arg(long, env = "IP2P_BENCH_STEPS", default_value_t = 20)]
    steps: usize,
    /// A CLIP tokenizer folder for the `edit` figure.
    #[arg(
        long,
        env = "IP2P_BENCH_TOKENIZER",
        default_value = "../shared/fixtures/clip-tokenizer"
    )]
    tokenizer: PathBuf,
    /// Where the `load` figure writes (and reuses) its full-size random-weight model folders.
    #[arg(long, env = "IP2P_BENCH_WEIGHTS_DIR")]
    weights_dir: Option<PathBuf>,
    /// The `load` figure with a packed-weight cache in this folder (written by the first load
    /// when absent, mapped by the later ones).
    #[arg(long, env = "IP2P_BENCH_PACKED_CACHE")]
    packed_cache: Option<PathBuf>,
    /// The device of the text, unet, vae and edit figures: auto, cpu, cuda, cuda:N.
    #[arg(long, env = "IP2P_BENCH_DEVICE", default_value = "cpu")]
    device: DeviceChoice,
    /// Their dtype: auto (f32 on the CPU, f16 on a GPU), f32, f16, bf16.
    #[arg(long, env = "IP2P_BENCH_DTYPE", default_value = "auto")]
    dtype: DTypeChoice,
    /// Their kernels: auto or generic.
    #[arg(long, env = "IP2P_BENCH_KERNELS", default_value = "auto")]
    kernels: Kernels,
}

/// `--dtype`: `auto` (the device's), `f32`, `f16`, `bf16`.
#[derive(Debug, Clone, Copy)]
struct DTypeChoice(Option<candle_core::DType>);

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

#[derive(Args, Debug)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    server: ip2p::server::ServerConfig,
}

#[derive(Args, Debug, Clone)]
struct ModelArgs {
    /// A diffusers folder or a Hugging Face hub id (e.g. timbrooks/instruct-pix2pix).
    #[arg(long, env = "IP2P_MODEL", default_value = "timbrooks/instruct-pix2pix")]
    model: String,
    /// Weight files to use: auto (full precision if present, else fp16), fp32, fp16.
    #[arg(long, env = "IP2P_VARIANT", default_value = "auto")]
    variant: Variant,
    /// auto (the first CUDA device if the build has CUDA and one can be opened, else the CPU),
    /// cpu, cuda, cuda:N. `serve` takes a list (cuda:0,cuda:1): one model worker per device.
    #[arg(long, env = "IP2P_DEVICE", default_value = "auto")]
    device: DeviceList,
    /// What the networks compute in: auto (f32 on the CPU, f16 on a GPU), f32, f16, bf16.
    #[arg(long, env = "IP2P_DTYPE", default_value = "auto")]
    dtype: DTypeChoice,
    /// auto (the fused CPU kernels where they apply) or generic (candle's ops only: the graph
    /// a GPU runs, on any device).
    #[arg(long, env = "IP2P_KERNELS", default_value = "auto")]
    kernels: Kernels,
    /// Use only the local Hugging Face cache (also HF_HUB_OFFLINE=1).
    #[arg(long, env = "IP2P_OFFLINE")]
    offline: bool,
    /// LoRA weights (diffusers/PEFT `pytorch_lora_weights.safetensors`) folded into the UNet.
    #[arg(long, env = "IP2P_LORA")]
    lora: Option<PathBuf>,
    /// A folder for caches of packed weights (CPU): the first start writes them (about 5 GB
    /// for SD 1.5), later starts map them instead of packing. Off when not given.
    #[arg(long, env = "IP2P_PACKED_CACHE")]
    packed_cache: Option<PathBuf>,
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
    /// Edit through a running `ip2p serve` (e.g. http://127.0.0.1:50051) instead of in-process.
    #[arg(long, env = "IP2P_SERVER")]
    server: Option<String>,
    /// Bearer token for `--server`.
    #[arg(long, env = "IP2P_TOKEN", hide_env_values = true)]
    token: Option<String>,
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
    if m.device.0.len() > 1 {
        anyhow::bail!("an edit runs on one device; a list is for `ip2p serve`");
    }
    load_pipeline_on(m, m.device.first())
}

fn load_pipeline_on(m: &ModelArgs, device: DeviceChoice) -> Result<EditPipeline> {
    let dev = device::open(device)?;
    let hub = HubOptions {
        offline: m.offline,
        fp16: m.variant == Variant::Fp16,
        ..Default::default()
    };
    let dir = ModelDir::open(&m.model, &hub)?;
    tracing::info!(model = %dir.root().display(), device = ?dev, "loading");
    let opts = LoadOptions {
        variant: m.variant,
        packed_cache: m.packed_cache.clone(),
        dtype: m.dtype.0,
        kernels: m.kernels,
        ..Default::default()
    };
    let mut components = loader::load(&dir, &dev, &opts)?;
    if let Some(l) = &m.lora {
        let n = ip2p::training::lora::merge_file(&mut components.unet, l)?;
        tracing::info!(lora = %l.display(), projections = n, "LoRA folded into the UNet");
    }
    Ok(EditPipeline::new(components)?)
}

fn edit(a: EditArgs) -> Result<()> {
    if a.server.is_some() {
        return edit_remote(a);
    }
    let seed = a.seed.unwrap_or_else(ip2p::pipeline::random_seed);
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

fn step_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg} [{bar:40}] {pos}/{len} steps, {elapsed} (eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// `ip2p edit --server`: the same edit through the gRPC service, progress from the stream.
fn edit_remote(a: EditArgs) -> Result<()> {
    use ip2p::server::proto;
    let url = a.server.clone().unwrap_or_default();
    let bytes =
        std::fs::read(&a.input).with_context(|| format!("reading {}", a.input.display()))?;
    let req = proto::EditRequest {
        image: Some(proto::Image {
            data: Some(proto::image::Data::Encoded(bytes)),
        }),
        instruction: a.instruction.clone(),
        negative_prompt: (!a.negative.is_empty()).then(|| a.negative.clone()),
        steps: Some(a.steps as u32),
        text_guidance: Some(a.text_guidance as f32),
        image_guidance: Some(a.image_guidance as f32),
        seed: a.seed,
        scheduler: a.scheduler.map(|s| s.name().to_owned()).unwrap_or_default(),
        resolution: Some(a.resolution),
        resize: match a.resize {
            ResizePolicy::Paper => proto::ResizePolicy::Paper as i32,
            ResizePolicy::Native => proto::ResizePolicy::Native as i32,
        },
        output_format: proto::OutputFormat::Png as i32,
        request_id: format!("cli-{:x}", ip2p::pipeline::random_seed()),
        ..Default::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let resp = rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(url.clone())
            .with_context(|| format!("bad server address {url}"))?
            .connect()
            .await
            .with_context(|| format!("connecting to {url}"))?;
        let token = a.token.clone();
        let mut client = proto::image_editor_client::ImageEditorClient::with_interceptor(
            channel,
            move |mut r: tonic::Request<()>| {
                if let Some(t) = &token {
                    let v = format!("Bearer {t}").parse().map_err(|_| {
                        tonic::Status::invalid_argument("token is not a valid header value")
                    })?;
                    r.metadata_mut().insert("authorization", v);
                }
                Ok(r)
            },
        )
        .max_decoding_message_size(usize::MAX);
        let mut stream = client.edit_stream(req).await?.into_inner();
        let bar = step_bar(a.steps as u64);
        bar.set_message("queued");
        let mut result = None;
        while let Some(ev) = stream.message().await? {
            use proto::edit_event::Event;
            match ev.event {
                Some(Event::Queued(q)) => bar.set_message(format!("queued ({} ahead)", q.position)),
                Some(Event::Started(_)) => bar.set_message("denoising"),
                Some(Event::Progress(p)) => bar.set_position(p.step as u64),
                Some(Event::Result(r)) => result = Some(r),
                None => {}
            }
        }
        bar.finish_and_clear();
        result.ok_or_else(|| anyhow::anyhow!("the server closed the stream without a result"))
    })?;
    let img = resp
        .images
        .first()
        .ok_or_else(|| anyhow::anyhow!("the server returned no image"))?;
    let decoded = image::load_from_memory(&img.data).context("decoding the server's image")?;
    save(&decoded, &a.output)?;
    let p = resp.parameters.unwrap_or_default();
    println!(
        "wrote {} ({}x{}, worked at {}x{}) seed {} scheduler {} steps {} via {}",
        a.output.display(),
        img.width,
        img.height,
        p.working_width,
        p.working_height,
        img.seed,
        p.scheduler,
        p.steps,
        url
    );
    Ok(())
}

fn serve(a: ServeArgs) -> Result<()> {
    let pipes = a
        .model
        .device
        .0
        .iter()
        .map(|&d| load_pipeline_on(&a.model, d))
        .collect::<Result<Vec<_>>>()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let handle = ip2p::server::start_many(a.server, pipes, a.model.model.clone()).await?;
        eprintln!(
            "ip2p serving {} on {} (gRPC, gRPC-Web, HTTP)",
            a.model.model, handle.addr
        );
        shutdown_signal().await;
        eprintln!("shutting down: letting in-flight edits finish");
        handle.shutdown().await;
        Ok::<(), anyhow::Error>(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Edit(a) => edit(a),
        Command::Serve(a) => serve(a),
        Command::Bench(a) => Ok(ip2p::bench::run(&ip2p::bench::BenchOptions {
            shapes: a.shapes,
            resolutions: a.res,
            reps: a.reps,
            only: a.only,
            steps: a.steps,
            tokenizer: a.tokenizer,
            weights_dir: a
                .weights_dir
                .unwrap_or_else(|| std::env::temp_dir().join("ip2p-bench-weights")),
            packed_cache: a.packed_cache,
            device: device::open(a.device)?,
            dtype: a.dtype.0,
            kernels: a.kernels,
        })?),
        Command::Extend(a) => extend(a),
        Command::Train(a) => train(a),
    }
}

fn main() {
    ip2p::device::tune_allocator();
    let cli = Cli::parse();
    let long_running = matches!(cli.command, Command::Serve(_) | Command::Train(_));
    ip2p::logging::init(cli.log_format, if long_running { "info" } else { "warn" });
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
