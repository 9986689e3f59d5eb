//! Server configuration: every flag is also an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;

/// `ip2p serve` settings.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerConfig {
    /// Address to listen on (gRPC, gRPC-Web and HTTP share it). Loopback by default.
    #[arg(long, env = "IP2P_ADDR", default_value = "127.0.0.1:50051")]
    pub addr: SocketAddr,
    /// Edits waiting beyond the one running; more are refused with RESOURCE_EXHAUSTED / 429.
    #[arg(long, env = "IP2P_QUEUE_CAPACITY", default_value_t = 16)]
    pub queue_capacity: usize,
    /// Largest accepted input, width × height (checked from the header before decoding).
    #[arg(long, env = "IP2P_MAX_PIXELS", default_value_t = 16_000_000)]
    pub max_pixels: u64,
    /// Largest request message or body, bytes.
    #[arg(long, env = "IP2P_MAX_MESSAGE_BYTES", default_value_t = 64 << 20)]
    pub max_message_bytes: usize,
    /// Most denoising steps a request may ask for.
    #[arg(long, env = "IP2P_MAX_STEPS", default_value_t = 1000)]
    pub max_steps: u32,
    /// Most variations (results) per request.
    #[arg(long, env = "IP2P_MAX_VARIATIONS", default_value_t = 4)]
    pub max_variations: u32,
    /// Longest instruction, in characters (longer than CLIP's 77 tokens is truncated and reported).
    #[arg(long, env = "IP2P_MAX_INSTRUCTION_CHARS", default_value_t = 2000)]
    pub max_instruction_chars: u32,
    /// Highest working resolution a request may ask for.
    #[arg(long, env = "IP2P_MAX_RESOLUTION", default_value_t = 1024)]
    pub max_resolution: u32,
    /// Default number of steps when a request does not say.
    #[arg(long, env = "IP2P_DEFAULT_STEPS", default_value_t = 100)]
    pub default_steps: u32,
    /// Default working resolution when a request does not say.
    #[arg(long, env = "IP2P_DEFAULT_RESOLUTION", default_value_t = 512)]
    pub default_resolution: u32,
    /// Require `Authorization: Bearer <token>` on every door (health checks excepted).
    #[arg(long, env = "IP2P_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM certificate chain: serve TLS (with `--tls-key`).
    #[arg(long, env = "IP2P_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `--tls-cert`.
    #[arg(long, env = "IP2P_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Origins allowed by CORS (comma-separated; `*` for any).
    #[arg(
        long,
        env = "IP2P_CORS_ORIGINS",
        default_value = "*",
        value_delimiter = ','
    )]
    pub cors_origins: Vec<String>,
    /// Side of the preview images sent in progress events, pixels.
    #[arg(long, env = "IP2P_PREVIEW_SIZE", default_value_t = 128)]
    pub preview_size: u32,
    /// A LoRA file a request may apply by name with a scale of its own (`loras` of a request),
    /// loaded once and matched against the model at start; repeatable, or comma-separated in
    /// the variable. (`--lora` folds files into the model for every request instead.)
    #[arg(
        long = "request-lora",
        env = "IP2P_REQUEST_LORAS",
        value_delimiter = ',',
        value_name = "NAME=FILE"
    )]
    pub request_loras: Vec<crate::loader::lora::NamedLora>,
    /// Skip the warm-up edit (health reports SERVING right after loading).
    #[arg(long, env = "IP2P_NO_WARMUP")]
    pub no_warmup: bool,
    /// On SIGTERM, how long to let in-flight edits finish, seconds.
    #[arg(long, env = "IP2P_DRAIN_SECONDS", default_value_t = 120)]
    pub drain_seconds: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            queue_capacity: 16,
            max_pixels: 16_000_000,
            max_message_bytes: 64 << 20,
            max_steps: 1000,
            max_variations: 4,
            max_instruction_chars: 2000,
            max_resolution: 1024,
            default_steps: 100,
            default_resolution: 512,
            token: None,
            tls_cert: None,
            tls_key: None,
            cors_origins: vec!["*".into()],
            preview_size: 128,
            request_loras: Vec::new(),
            no_warmup: false,
            drain_seconds: 120,
        }
    }
}
