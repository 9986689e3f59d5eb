//! The text stage: an LLM turns a caption into an edit instruction and the edited caption.
//!
//! Any OpenAI-compatible chat endpoint works (hosted APIs, llama.cpp, vLLM). The request asks
//! for JSON-schema structured output, shows the model the few-shot examples kept in this crate
//! (the paper fine-tuned GPT-3 on ~700 human-written ones), and samples at temperature 0.7.
//! Every answer is validated; an answer that is not the JSON asked for is asked again with a
//! fresh sample (up to `max_invalid_retries` times), any other bad one is rejected at once;
//! rejects are counted, never written.

use std::sync::Arc;
use std::time::Duration;

use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestAssistantMessage, ChatCompletionRequestMessage,
    ChatCompletionRequestSystemMessage, ChatCompletionRequestUserMessage,
    CreateChatCompletionRequestArgs, ResponseFormat, ResponseFormatJsonSchema,
};
use async_openai::Client;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::input::{dedupe_key, Triple};
use crate::retry::{RetryPolicy, RetryService, RetryStats};

/// The few-shot examples: `{input, edit, output}` per line.
pub const FEW_SHOT: &str = include_str!("../data/fewshot.jsonl");

const SYSTEM: &str = "You write image-editing data. Given a caption of an image, reply with an \
instruction that edits the image in one clear, visual way, and the caption of the edited image. \
The edited caption keeps everything the edit does not change, word for word where possible. \
Vary the kind of edit: objects, style, season, weather, time of day, material, background, \
medium. Reply with JSON only: {\"instruction\": ..., \"edited_caption\": ...}.";

/// Why an answer (or a caption) was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reject {
    /// The answer was not the JSON object asked for.
    InvalidJson,
    /// The instruction or the edited caption was empty.
    EmptyField,
    /// The edited caption equals the input caption.
    Unchanged,
    /// The instruction or edited caption is longer than allowed.
    TooLong,
    /// The input caption itself is longer than allowed (not sent).
    CaptionTooLong,
    /// The model refused or sent no content.
    Refused,
    /// The request failed after every retry.
    RequestFailed,
}

impl Reject {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::EmptyField => "empty_field",
            Self::Unchanged => "unchanged",
            Self::TooLong => "too_long",
            Self::CaptionTooLong => "caption_too_long",
            Self::Refused => "refused",
            Self::RequestFailed => "request_failed",
        }
    }
}

/// The structured answer.
#[derive(Debug, Deserialize)]
struct Answer {
    instruction: String,
    edited_caption: String,
}

/// The JSON schema the answer must follow.
pub fn answer_schema() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "instruction": {"type": "string", "description": "the edit, as an imperative sentence"},
            "edited_caption": {"type": "string", "description": "the caption of the edited image"}
        },
        "required": ["instruction", "edited_caption"],
        "additionalProperties": false
    })
}

/// Checks an answer's text against the caption it was asked for.
pub fn validate(
    caption: &str,
    content: &str,
    max_chars: usize,
) -> std::result::Result<Triple, Reject> {
    let mut s = content.trim();
    // Some local servers wrap JSON in a Markdown fence even in JSON mode.
    if let Some(inner) = s.strip_prefix("```") {
        let inner = inner.strip_prefix("json").unwrap_or(inner);
        s = inner.strip_suffix("```").unwrap_or(inner).trim();
    }
    let a: Answer = serde_json::from_str(s).map_err(|_| Reject::InvalidJson)?;
    let edit = a.instruction.trim();
    let output = a.edited_caption.trim();
    if edit.is_empty() || output.is_empty() {
        return Err(Reject::EmptyField);
    }
    if edit.chars().count() > max_chars || output.chars().count() > max_chars {
        return Err(Reject::TooLong);
    }
    if dedupe_key(output) == dedupe_key(caption) {
        return Err(Reject::Unchanged);
    }
    Ok(Triple {
        input: caption.to_owned(),
        edit: edit.to_owned(),
        output: output.to_owned(),
    })
}

/// How to reach and use the LLM.
#[derive(Debug, Clone)]
pub struct LlmConfig {
    /// e.g. `https://api.openai.com/v1` or `http://localhost:8080/v1`.
    pub base_url: String,
    pub model: String,
    pub api_key: Option<String>,
    pub temperature: f32,
    pub max_tokens: u32,
    /// Longest instruction / edited caption / input caption accepted, in characters.
    pub max_chars: usize,
    /// Few-shot examples shown per request (from [`FEW_SHOT`]).
    pub few_shot: usize,
    /// Ask for `json_schema` structured output (else plain JSON mode).
    pub json_schema: bool,
    pub retry: RetryPolicy,
    /// How many times an answer that is not the JSON asked for (models drift out of the
    /// format now and then, even with structured output) is asked again before the caption
    /// is rejected as `invalid_json`.
    pub max_invalid_retries: u32,
}

impl Default for LlmConfig {
    fn default() -> Self {
        Self {
            base_url: "https://api.openai.com/v1".into(),
            model: "gpt-4o-mini".into(),
            api_key: None,
            temperature: 0.7,
            max_tokens: 256,
            max_chars: 300,
            few_shot: 20,
            json_schema: true,
            retry: RetryPolicy::default(),
            max_invalid_retries: 2,
        }
    }
}

/// Makes sure rustls has a crypto provider (we build with `ring`, not the default aws-lc).
pub fn ensure_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Writes edits for captions.
#[derive(Debug, Clone)]
pub struct EditWriter {
    client: Client<OpenAIConfig>,
    config: LlmConfig,
    examples: Arc<Vec<Triple>>,
    stats: Arc<RetryStats>,
}

impl EditWriter {
    pub fn new(config: LlmConfig) -> Result<Self> {
        ensure_crypto_provider();
        let mut oc = OpenAIConfig::new().with_api_base(config.base_url.trim_end_matches('/'));
        if let Some(k) = &config.api_key {
            oc = oc.with_api_key(k.clone());
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| Error::Config(format!("HTTP client: {e}")))?;
        let stats = Arc::new(RetryStats::default());
        let service = RetryService::new(http, config.retry.clone(), stats.clone());
        let client = Client::with_config(oc).with_http_service(service);
        let examples = FEW_SHOT
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(serde_json::from_str::<Triple>)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::Config(format!("few-shot examples: {e}")))?;
        Ok(Self {
            client,
            config,
            examples: Arc::new(examples),
            stats,
        })
    }

    pub fn stats(&self) -> &RetryStats {
        &self.stats
    }

    fn messages(&self, caption: &str) -> Vec<ChatCompletionRequestMessage> {
        let mut m: Vec<ChatCompletionRequestMessage> =
            vec![ChatCompletionRequestSystemMessage::from(SYSTEM).into()];
        for ex in self.examples.iter().take(self.config.few_shot) {
            m.push(ChatCompletionRequestUserMessage::from(ex.input.as_str()).into());
            let answer = serde_json::json!({"instruction": ex.edit, "edited_caption": ex.output});
            m.push(ChatCompletionRequestAssistantMessage::from(answer.to_string()).into());
        }
        m.push(ChatCompletionRequestUserMessage::from(caption).into());
        m
    }

    /// Asks for one caption's edit. Never fails: a failure is a [`Reject`]. An answer that is
    /// not the JSON asked for is asked again (a fresh sample), up to `max_invalid_retries`
    /// times; every other outcome is final at once.
    pub async fn write(&self, caption: &str) -> std::result::Result<Triple, Reject> {
        if caption.chars().count() > self.config.max_chars {
            return Err(Reject::CaptionTooLong);
        }
        let mut retries = 0;
        loop {
            match self.ask(caption).await {
                Err(Reject::InvalidJson) if retries < self.config.max_invalid_retries => {
                    retries += 1;
                    self.stats
                        .invalid_json
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::debug!(
                        caption,
                        retries,
                        "answer was not the JSON asked for: asking again"
                    );
                }
                outcome => return outcome,
            }
        }
    }

    /// One request for `caption`'s edit, its answer validated.
    async fn ask(&self, caption: &str) -> std::result::Result<Triple, Reject> {
        let format = if self.config.json_schema {
            ResponseFormat::JsonSchema {
                json_schema: ResponseFormatJsonSchema {
                    description: Some("An image edit instruction and the edited caption".into()),
                    name: "image_edit".into(),
                    schema: answer_schema(),
                    strict: Some(true),
                },
            }
        } else {
            ResponseFormat::JsonObject
        };
        let request = CreateChatCompletionRequestArgs::default()
            .model(self.config.model.clone())
            .messages(self.messages(caption))
            .temperature(self.config.temperature)
            .max_completion_tokens(self.config.max_tokens)
            .response_format(format)
            .build();
        let request = match request {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "building the chat request");
                return Err(Reject::RequestFailed);
            }
        };
        let response = match self.client.chat().create(request).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(caption, error = %e, "LLM request failed after retries");
                return Err(Reject::RequestFailed);
            }
        };
        let Some(choice) = response.choices.into_iter().next() else {
            return Err(Reject::Refused);
        };
        match choice.message.content {
            Some(c) if !c.trim().is_empty() => validate(caption, &c, self.config.max_chars),
            _ => Err(Reject::Refused),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_validated() {
        let ok = r#"{"instruction": "make it night", "edited_caption": "a street at night"}"#;
        let t = validate("a street", ok, 100).expect("valid");
        assert_eq!(t.edit, "make it night");
        let fenced = format!("```json\n{ok}\n```");
        assert!(validate("a street", &fenced, 100).is_ok());
        assert_eq!(
            validate("a street", "{not json", 100),
            Err(Reject::InvalidJson)
        );
        assert_eq!(
            validate("a street", r#"{"instruction": "x"}"#, 100),
            Err(Reject::InvalidJson)
        );
        assert_eq!(
            validate(
                "a street",
                r#"{"instruction": " ", "edited_caption": "y"}"#,
                100
            ),
            Err(Reject::EmptyField)
        );
        assert_eq!(
            validate(
                "A  Street",
                r#"{"instruction": "x", "edited_caption": "a street"}"#,
                100
            ),
            Err(Reject::Unchanged)
        );
        assert_eq!(validate("a street", ok, 10), Err(Reject::TooLong));
    }

    #[test]
    fn the_few_shot_examples_parse_and_are_valid_answers() {
        let n = FEW_SHOT
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str::<Triple>(l).expect("example"))
            .inspect(|t| assert_ne!(dedupe_key(&t.input), dedupe_key(&t.output)))
            .count();
        assert!(n >= 20);
    }
}
