//! Log output for the binaries: human-readable text (coloured only on a terminal, and never
//! with `NO_COLOR` set) or one JSON object per line for log collectors.

use std::io::IsTerminal;

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines; ANSI colour only when stderr is a terminal and `NO_COLOR` is unset.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields`, `target`, and the enclosing
    /// spans' fields, such as an edit's `request_id`).
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err(format!("unknown log format `{s}` (text, json)")),
        }
    }
}

/// Whether text logs may carry colour: stderr is a terminal and `NO_COLOR` is unset or empty
/// (<https://no-color.org>).
pub fn colour_allowed() -> bool {
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    !no_color && std::io::stderr().is_terminal()
}

/// Installs the global subscriber: `RUST_LOG` when set, else `default_filter`.
pub fn init(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(colour_allowed()).init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}
