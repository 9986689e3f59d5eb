//! `ip2p edit`: one edit in this process, or through a running server (`--server`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use ip2p::pipeline::edit::{DEFAULT_IMAGE_GUIDANCE, DEFAULT_TEXT_GUIDANCE};
use ip2p::pipeline::{image as img, Control, EditParams, ResizePolicy, StepInfo};
use ip2p::schedulers::SchedulerKind;
use ip2p::server::{client, proto};

use super::model::ModelArgs;
use super::progress;

#[derive(Args, Debug)]
pub struct EditArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The image to edit (PNG, JPEG, WebP, ...).
    #[arg(env = "IP2P_INPUT")]
    pub input: PathBuf,
    /// What to change, e.g. "turn the sunflowers into roses".
    #[arg(env = "IP2P_INSTRUCTION")]
    pub instruction: String,
    /// Where to write the result (format from the extension).
    #[arg(short, long, env = "IP2P_OUTPUT", default_value = "edited.png")]
    pub output: PathBuf,
    #[arg(long, env = "IP2P_STEPS", default_value_t = 100)]
    pub steps: usize,
    /// How strongly to follow the instruction (s_T).
    #[arg(long, env = "IP2P_TEXT_GUIDANCE", default_value_t = DEFAULT_TEXT_GUIDANCE)]
    pub text_guidance: f64,
    /// How strongly to stay close to the input (s_I).
    #[arg(long, env = "IP2P_IMAGE_GUIDANCE", default_value_t = DEFAULT_IMAGE_GUIDANCE)]
    pub image_guidance: f64,
    /// Random seed (printed when not given).
    #[arg(long, env = "IP2P_SEED")]
    pub seed: Option<u64>,
    /// euler_a, euler, ddim, dpmpp_2m, dpmpp_2m_karras (default: the model's own).
    #[arg(long, env = "IP2P_SCHEDULER")]
    pub scheduler: Option<SchedulerKind>,
    /// Long side the model works at (paper policy).
    #[arg(long, env = "IP2P_RESOLUTION", default_value_t = 512)]
    pub resolution: u32,
    /// paper (sides multiples of 64, long side ≈ resolution) or native (floor to multiples of 8).
    #[arg(long, env = "IP2P_RESIZE", default_value = "paper")]
    pub resize: ResizePolicy,
    /// Negative prompt, used as the unconditional text.
    #[arg(long, env = "IP2P_NEGATIVE", default_value = "")]
    pub negative: String,
    /// Write the working-resolution image instead of resizing back to the input's size.
    #[arg(long, env = "IP2P_KEEP_WORKING_SIZE")]
    pub keep_working_size: bool,
    /// Edit through a running `ip2p serve` (e.g. http://127.0.0.1:50051) instead of in-process.
    #[arg(long, env = "IP2P_SERVER")]
    pub server: Option<String>,
    /// Bearer token for `--server`.
    #[arg(long, env = "IP2P_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl EditArgs {
    /// The edit's parameters (a random seed, printed with the result, when none is given).
    fn params(&self) -> EditParams {
        EditParams {
            instruction: self.instruction.clone(),
            negative_prompt: self.negative.clone(),
            steps: self.steps,
            text_guidance: self.text_guidance,
            image_guidance: self.image_guidance,
            scheduler: self.scheduler,
            seed: self.seed.unwrap_or_else(ip2p::pipeline::random_seed),
            resolution: self.resolution,
            resize: self.resize,
            keep_working_size: self.keep_working_size,
        }
    }
}

pub fn run(a: EditArgs) -> Result<()> {
    let params = a.params();
    params.validate()?;
    if a.server.is_some() {
        return remote(a, &params);
    }
    let input = img::open(&a.input, &img::DecodeLimits::default())?;
    let pipe = a.model.load_pipeline()?;
    let bar = progress::bar(a.steps as u64, progress::STEPS);
    bar.set_message("denoising");
    let mut on_step = |i: &StepInfo<'_>| {
        bar.set_position(i.step as u64);
        Control::Continue
    };
    let out = pipe.edit(&input, &params, &mut on_step)?;
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

/// The same edit through the gRPC service, progress from its event stream.
fn remote(a: EditArgs, params: &EditParams) -> Result<()> {
    let url = a.server.clone().unwrap_or_default();
    let bytes =
        std::fs::read(&a.input).with_context(|| format!("reading {}", a.input.display()))?;
    let req = proto::EditRequest {
        image: Some(proto::Image {
            data: Some(proto::image::Data::Encoded(bytes)),
        }),
        // A seed the user did not choose is the server's to draw.
        seed: a.seed,
        output_format: proto::OutputFormat::Png as i32,
        request_id: format!("cli-{:x}", ip2p::pipeline::random_seed()),
        ..proto::EditRequest::from(params)
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let resp = rt.block_on(async {
        let mut client = client::connect(&url, a.token.as_deref()).await?;
        let mut stream = client.edit_stream(req).await?.into_inner();
        let bar = progress::bar(a.steps as u64, progress::STEPS);
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

/// Writes `image` in the format of `path`'s extension (JPEG without alpha).
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
