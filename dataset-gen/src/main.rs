//! `dataset-gen`: InstructPix2Pix training data from captions.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use dataset_gen::llm::LlmConfig;
use dataset_gen::render::{FilterConfig, ImageConfig};
use dataset_gen::retry::RetryPolicy;
use dataset_gen::run::{run, RunConfig};
use dataset_gen::world::World;
use ip2p::device::DeviceChoice;
use ip2p::loader::HubOptions;

/// Captions in; (caption, instruction, edited caption, image pair) rows out, as Parquet.
#[derive(Debug, Parser)]
#[command(name = "dataset-gen", version, about)]
struct Args {
    /// Captions or triples: text lines, JSONL (`caption`/`text`, or the paper's `input`, `edit`,
    /// `output`) or Parquet. Repeat or separate with commas.
    #[arg(
        long,
        env = "DATASET_GEN_INPUT",
        required_unless_present = "world",
        value_delimiter = ','
    )]
    input: Vec<PathBuf>,
    /// Make the data from a procedural world instead (no inputs, LLM or models): `flowers`
    /// renders scenes and their edits at --width × --height, seeded by --seed.
    #[arg(long, env = "DATASET_GEN_WORLD")]
    world: Option<World>,
    /// How many examples a world run makes (across all shards).
    #[arg(long, env = "DATASET_GEN_WORLD_EXAMPLES", default_value_t = 10_000)]
    world_examples: usize,
    /// The caption column/field (default: the first of caption, input, text, TEXT, prompt, original_prompt).
    #[arg(long, env = "DATASET_GEN_CAPTION_COLUMN")]
    caption_column: Option<String>,
    /// Use only the first N items (after de-duplication).
    #[arg(long, env = "DATASET_GEN_LIMIT")]
    limit: Option<usize>,
    /// Output folder: data/*.parquet, ledger/, summary/.
    #[arg(long, env = "DATASET_GEN_OUT")]
    out: PathBuf,
    /// This worker's shard (default: $JOB_COMPLETION_INDEX or $SLURM_ARRAY_TASK_ID, else 0).
    #[arg(long, env = "DATASET_GEN_SHARD")]
    shard: Option<usize>,
    /// Number of shards (default: $SLURM_ARRAY_TASK_COUNT, else 1).
    #[arg(long, env = "DATASET_GEN_NUM_SHARDS")]
    num_shards: Option<usize>,
    /// Items per committed Parquet part.
    #[arg(long, env = "DATASET_GEN_ITEMS_PER_PART", default_value_t = 16)]
    items_per_part: usize,

    /// OpenAI-compatible endpoint (hosted API, llama.cpp, vLLM, ...).
    #[arg(
        long,
        env = "DATASET_GEN_LLM_BASE_URL",
        default_value = "https://api.openai.com/v1"
    )]
    llm_base_url: String,
    #[arg(long, env = "DATASET_GEN_LLM_MODEL", default_value = "gpt-4o-mini")]
    llm_model: String,
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    llm_api_key: Option<String>,
    /// Requests in flight at once.
    #[arg(long, env = "DATASET_GEN_LLM_CONCURRENCY", default_value_t = 8)]
    llm_concurrency: usize,
    #[arg(long, env = "DATASET_GEN_LLM_TEMPERATURE", default_value_t = 0.7)]
    llm_temperature: f32,
    #[arg(long, env = "DATASET_GEN_LLM_MAX_TOKENS", default_value_t = 256)]
    llm_max_tokens: u32,
    /// Log lines as text (coloured only on a terminal; NO_COLOR turns colour off) or json.
    #[arg(long, env = "DATASET_GEN_LOG_FORMAT", default_value = "text")]
    log_format: ip2p::logging::LogFormat,
    #[arg(long, env = "DATASET_GEN_LLM_MAX_RETRIES", default_value_t = 6)]
    llm_max_retries: u32,
    /// Times an answer that is not the JSON asked for is asked again (a fresh sample) before
    /// its caption is rejected as invalid_json.
    #[arg(long, env = "DATASET_GEN_LLM_MAX_INVALID_RETRIES", default_value_t = 2)]
    llm_max_invalid_retries: u32,
    /// One attempt's time limit, in seconds.
    #[arg(long, env = "DATASET_GEN_LLM_TIMEOUT", default_value_t = 60.0)]
    llm_timeout: f64,
    /// Longest caption, instruction or edited caption accepted, in characters.
    #[arg(long, env = "DATASET_GEN_MAX_CHARS", default_value_t = 300)]
    max_chars: usize,
    /// Few-shot examples per request.
    #[arg(long, env = "DATASET_GEN_FEW_SHOT", default_value_t = 20)]
    few_shot: usize,
    /// Ask for plain JSON mode instead of a JSON schema (for servers without structured output).
    #[arg(long, env = "DATASET_GEN_NO_JSON_SCHEMA")]
    no_json_schema: bool,

    /// Stable Diffusion 1.x folder or hub id.
    #[arg(
        long,
        env = "DATASET_GEN_MODEL",
        default_value = "runwayml/stable-diffusion-v1-5"
    )]
    model: String,
    /// A LoRA for the Stable Diffusion model, FILE[:SCALE] (PEFT or kohya; repeatable).
    #[arg(long, env = "DATASET_GEN_LORA", value_delimiter = ',')]
    lora: Vec<ip2p::loader::lora::LoraSpec>,
    /// A Textual Inversion embedding, FILE[:TOKEN] (A1111 or diffusers; repeatable): its
    /// trigger word may then appear in captions and edited captions.
    #[arg(long, env = "DATASET_GEN_EMBEDDING", value_delimiter = ',')]
    embedding: Vec<ip2p::loader::embeddings::EmbeddingSpec>,
    /// An A1111 hypernetwork for the Stable Diffusion model, FILE[:STRENGTH].
    #[arg(long, env = "DATASET_GEN_HYPERNETWORK")]
    hypernetwork: Option<ip2p::loader::hypernetwork::HypernetworkSpec>,
    /// CLIP folder or hub id.
    #[arg(
        long,
        env = "DATASET_GEN_CLIP",
        default_value = "openai/clip-vit-large-patch14"
    )]
    clip: String,
    /// Never download (also HF_HUB_OFFLINE=1).
    #[arg(long, env = "DATASET_GEN_OFFLINE")]
    offline: bool,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, env = "DATASET_GEN_DEVICE", default_value = "auto")]
    device: DeviceChoice,
    #[arg(long, env = "DATASET_GEN_WIDTH", default_value_t = 512)]
    width: u32,
    #[arg(long, env = "DATASET_GEN_HEIGHT", default_value_t = 512)]
    height: u32,
    /// Euler ancestral steps per render.
    #[arg(long, env = "DATASET_GEN_STEPS", default_value_t = 100)]
    steps: usize,
    /// Samples drawn per triple.
    #[arg(long, env = "DATASET_GEN_SAMPLES", default_value_t = 100)]
    samples: usize,
    /// Samples kept per triple (best directional similarity first).
    #[arg(long, env = "DATASET_GEN_KEEP", default_value_t = 4)]
    keep: usize,
    #[arg(long, env = "DATASET_GEN_GUIDANCE_MIN", default_value_t = 7.5)]
    guidance_min: f64,
    #[arg(long, env = "DATASET_GEN_GUIDANCE_MAX", default_value_t = 15.0)]
    guidance_max: f64,
    #[arg(long, env = "DATASET_GEN_P2P_MIN", default_value_t = 0.1)]
    p2p_min: f64,
    #[arg(long, env = "DATASET_GEN_P2P_MAX", default_value_t = 0.9)]
    p2p_max: f64,
    #[arg(long, env = "DATASET_GEN_NEGATIVE_PROMPT", default_value = "")]
    negative_prompt: String,
    /// Minimum cos(image₀, image₁).
    #[arg(
        long,
        env = "DATASET_GEN_MIN_IMAGE_IMAGE",
        default_value_t = 0.75,
        allow_negative_numbers = true
    )]
    min_image_image: f32,
    /// Minimum cos(image₁ − image₀, caption₁ − caption₀).
    #[arg(
        long,
        env = "DATASET_GEN_MIN_DIRECTION",
        default_value_t = 0.2,
        allow_negative_numbers = true
    )]
    min_direction: f32,
    /// Minimum cos(imageₖ, captionₖ).
    #[arg(
        long,
        env = "DATASET_GEN_MIN_IMAGE_TEXT",
        default_value_t = 0.2,
        allow_negative_numbers = true
    )]
    min_image_text: f32,
    /// Run seed: with an item's index it fixes every sample.
    #[arg(long, env = "DATASET_GEN_SEED", default_value_t = 0)]
    seed: u64,
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

impl TryFrom<Args> for RunConfig {
    type Error = anyhow::Error;

    /// The shard from the flags, else from a Kubernetes indexed job or a Slurm array.
    fn try_from(a: Args) -> anyhow::Result<Self> {
        let shard = a
            .shard
            .or_else(|| env_usize("JOB_COMPLETION_INDEX"))
            .or_else(|| env_usize("SLURM_ARRAY_TASK_ID"))
            .unwrap_or(0);
        let num_shards = a
            .num_shards
            .or_else(|| env_usize("SLURM_ARRAY_TASK_COUNT"))
            .unwrap_or(1);
        if !(a.llm_timeout.is_finite() && a.llm_timeout > 0.0) {
            anyhow::bail!("--llm-timeout must be a positive number of seconds");
        }
        let llm = LlmConfig {
            base_url: a.llm_base_url,
            model: a.llm_model,
            api_key: a.llm_api_key,
            temperature: a.llm_temperature,
            max_tokens: a.llm_max_tokens,
            max_chars: a.max_chars,
            few_shot: a.few_shot,
            json_schema: !a.no_json_schema,
            max_invalid_retries: a.llm_max_invalid_retries,
            retry: RetryPolicy {
                max_retries: a.llm_max_retries,
                attempt_timeout: Duration::from_secs_f64(a.llm_timeout),
                ..Default::default()
            },
        };
        Ok(RunConfig {
            inputs: a.input,
            caption_column: a.caption_column,
            limit: a.limit,
            out: a.out,
            shard,
            num_shards,
            items_per_part: a.items_per_part,
            llm: Some(llm),
            llm_concurrency: a.llm_concurrency,
            model: a.model,
            loras: a.lora,
            embeddings: a.embedding,
            hypernetwork: a.hypernetwork,
            clip: a.clip,
            hub: HubOptions {
                offline: a.offline,
                ..Default::default()
            },
            device: ip2p::device::open(a.device).context("opening the device")?,
            image: ImageConfig {
                width: a.width,
                height: a.height,
                steps: a.steps,
                samples: a.samples,
                keep: a.keep,
                guidance_min: a.guidance_min,
                guidance_max: a.guidance_max,
                p2p_min: a.p2p_min,
                p2p_max: a.p2p_max,
                negative_prompt: a.negative_prompt,
                filter: FilterConfig {
                    min_image_image: a.min_image_image,
                    min_direction: a.min_direction,
                    min_image_text: a.min_image_text,
                },
                seed: a.seed,
            },
            progress_bars: std::io::stderr().is_terminal(),
            world: a.world.map(|w| (w, a.world_examples)),
        })
    }
}

fn main() -> anyhow::Result<()> {
    ip2p::device::tune_allocator();
    let a = Args::parse();
    ip2p::logging::init(a.log_format, "info");
    let cfg = RunConfig::try_from(a)?;
    let out = cfg.out.clone();
    let world = cfg.world.is_some();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let s = rt.block_on(run(cfg))?;
    let im = &s.images;
    let kept = if world {
        format!("{} exact pairs rendered", im.samples_rendered)
    } else {
        format!(
            "{} of {} samples passed the CLIP filter",
            im.samples_passed, im.samples_rendered
        )
    };
    println!(
        "shard {}/{}: {} rows written in {} parts this run ({} rows in {} parts in total); {kept}; summary in {}",
        s.shard,
        s.num_shards,
        im.rows,
        im.parts_written,
        s.dataset_rows,
        s.dataset_parts,
        out.join("summary").display()
    );
    Ok(())
}
