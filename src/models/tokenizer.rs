//! The CLIP BPE tokenizer, built with the `tokenizers` crate.
//!
//! Built from a model's `tokenizer/vocab.json` + `merges.txt` (what the real repositories ship)
//! with CLIP's normalisation (NFC, whitespace runs folded to one space, lower-case) and
//! pre-tokenisation, or loaded from a `tokenizer.json`. BOS/EOS, truncation and padding to the
//! context length are done here, as transformers' `CLIPTokenizer(padding="max_length")` does.

use std::path::Path;

use serde_json::{json, Value};
use tokenizers::Tokenizer;

use crate::{Error, Result};

/// The CLIP context length.
pub const MAX_LEN: usize = 77;

/// A tokenised prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokenized {
    /// Exactly `max_len` ids: BOS, text, EOS, EOS padding.
    pub ids: Vec<u32>,
    /// How many text tokens (without BOS/EOS) were cut to fit.
    pub truncated_tokens: usize,
}

/// CLIP's BPE tokenizer.
#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    max_len: usize,
    /// Multi-vector Textual Inversion triggers and the tokens each expands to.
    expansions: Vec<(String, u32, String)>,
    /// Every Textual Inversion trigger word added, in order.
    triggers: Vec<String>,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("max_len", &self.max_len)
            .finish()
    }
}

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

impl ClipTokenizer {
    /// Loads a tokenizer folder: `tokenizer.json` if present, else `vocab.json` + `merges.txt`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        let mut tok = if tj.is_file() {
            Self::from_tokenizer_json(&tj)?
        } else {
            let vocab = dir.join("vocab.json");
            let merges = dir.join("merges.txt");
            for f in [&vocab, &merges] {
                if !f.is_file() {
                    return Err(Error::MissingFile {
                        dir: dir.to_path_buf(),
                        file: f
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default(),
                    });
                }
            }
            Self::from_vocab_merges(&vocab, &merges)?
        };
        // tokenizer_config.json may set another context length or pad token (SD 2.x pads with "!").
        let cfg = dir.join("tokenizer_config.json");
        if cfg.is_file() {
            let v: Value = serde_json::from_str(&read(&cfg)?).map_err(|e| Error::Config {
                path: cfg.clone(),
                message: e.to_string(),
            })?;
            if let Some(n) = v.get("model_max_length").and_then(Value::as_u64) {
                if (2..=4096).contains(&n) {
                    tok.max_len = n as usize;
                }
            }
            let pad = v.get("pad_token").and_then(|p| {
                p.as_str()
                    .map(str::to_owned)
                    .or_else(|| p.get("content").and_then(Value::as_str).map(str::to_owned))
            });
            if let Some(id) = pad.and_then(|p| tok.inner.token_to_id(&p)) {
                tok.pad = id;
            }
        }
        Ok(tok)
    }

    /// Builds the CLIP tokenizer from `vocab.json` and `merges.txt`.
    pub fn from_vocab_merges(vocab: &Path, merges: &Path) -> Result<Self> {
        let vocab_v: Value = serde_json::from_str(&read(vocab)?).map_err(|e| Error::Config {
            path: vocab.to_path_buf(),
            message: e.to_string(),
        })?;
        let merges_v: Vec<Value> = read(merges)?
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .map(|l| Value::String(l.to_owned()))
            .collect();
        let vocab_map = vocab_v.as_object().ok_or_else(|| Error::Config {
            path: vocab.to_path_buf(),
            message: "vocab.json is not an object".into(),
        })?;
        let id_of = |t: &str| vocab_map.get(t).and_then(Value::as_u64);
        let (bos_id, eos_id) = match (id_of(BOS), id_of(EOS)) {
            (Some(b), Some(e)) => (b, e),
            _ => {
                return Err(Error::Tokenizer(format!(
                    "{} lacks {BOS} or {EOS}",
                    vocab.display()
                )))
            }
        };
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [
                {"id": bos_id, "content": BOS, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
                {"id": eos_id, "content": EOS, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
            ],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "NFC"},
                {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
                {"type": "Lowercase"}
            ]},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": "<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"}, "behavior": "Removed", "invert": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
            ]},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": EOS,
                "continuing_subword_prefix": "", "end_of_word_suffix": "</w>",
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab_v, "merges": merges_v
            }
        });
        let inner: Tokenizer = serde_json::from_value(spec)
            .map_err(|e| Error::Tokenizer(format!("building the CLIP BPE: {e}")))?;
        Ok(Self::wrap(inner))
    }

    /// Loads a `tokenizer.json` written by `tokenizers`.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self::wrap(inner))
    }

    fn wrap(mut inner: Tokenizer) -> Self {
        // BOS/EOS/padding/truncation are applied in `encode`.
        inner.with_truncation(None).ok();
        inner.with_padding(None);
        let bos = inner.token_to_id(BOS).unwrap_or(49406);
        let eos = inner.token_to_id(EOS).unwrap_or(49407);
        Self {
            inner,
            bos,
            eos,
            pad: eos,
            max_len: MAX_LEN,
            expansions: Vec::new(),
            triggers: Vec::new(),
        }
    }

    /// Adds the tokens of a Textual Inversion embedding (`token`, `token_1`, …), as
    /// transformers' `add_tokens` does: matched before BPE, ids after everything the tokenizer
    /// has. Returns their ids. A token the tokenizer already has is an error (diffusers refuses
    /// it too).
    pub fn add_embedding_tokens(&mut self, tokens: &[String]) -> Result<Vec<u32>> {
        let Some(first) = tokens.first() else {
            return Ok(Vec::new());
        };
        for t in tokens {
            if self.inner.token_to_id(t).is_some() {
                return Err(Error::Tokenizer(format!(
                    "the token `{t}` is already in the tokenizer; bind the embedding to another word (FILE:TOKEN)"
                )));
            }
        }
        let added: Vec<tokenizers::AddedToken> = tokens
            .iter()
            .map(|t| tokenizers::AddedToken::from(t.clone(), false))
            .collect();
        self.inner.add_tokens(&added);
        let ids = tokens
            .iter()
            .map(|t| {
                self.inner
                    .token_to_id(t)
                    .ok_or_else(|| Error::Tokenizer(format!("`{t}` was not added")))
            })
            .collect::<Result<Vec<_>>>()?;
        self.triggers.push(first.clone());
        if tokens.len() > 1 {
            self.expansions
                .push((first.clone(), ids[0], tokens.join(" ")));
        }
        Ok(ids)
    }

    /// The trigger words of the Textual Inversion embeddings bound so far.
    pub fn embedding_triggers(&self) -> &[String] {
        &self.triggers
    }

    /// Every id the tokenizer can produce is below this.
    pub fn vocab_len(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// diffusers' `maybe_convert_prompt`: each multi-vector trigger the prompt's tokens hold is
    /// replaced, as text, by all of its tokens.
    fn expand(&self, text: &str) -> Result<String> {
        if self.expansions.is_empty() {
            return Ok(text.to_owned());
        }
        let ids = self.raw_ids(text)?;
        let mut out = text.to_owned();
        for (trigger, id, all) in &self.expansions {
            if ids.contains(id) {
                out = out.replace(trigger.as_str(), all);
            }
        }
        Ok(out)
    }

    /// The context length (77 for CLIP).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Number of BPE tokens of `text` without BOS/EOS.
    pub fn count_tokens(&self, text: &str) -> Result<usize> {
        Ok(self.bpe(text)?.len())
    }

    /// The text's ids without BOS/EOS and without expanding triggers (`tokenizer.encode(text,
    /// add_special_tokens=False)`).
    pub fn raw_ids(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text's tokens without BOS/EOS, multi-vector triggers expanded.
    fn bpe(&self, text: &str) -> Result<Vec<u32>> {
        self.raw_ids(&self.expand(text)?)
    }

    /// `[BOS, text…, EOS, pad…]`, exactly `max_len` ids; longer text is truncated (and reported).
    pub fn encode(&self, text: &str) -> Result<Tokenized> {
        let body = self.bpe(text)?;
        let room = self.max_len - 2;
        let truncated_tokens = body.len().saturating_sub(room);
        let mut ids = Vec::with_capacity(self.max_len);
        ids.push(self.bos);
        ids.extend(body.iter().take(room));
        ids.push(self.eos);
        ids.resize(self.max_len, self.pad);
        Ok(Tokenized {
            ids,
            truncated_tokens,
        })
    }

    /// Decodes ids back to text (special tokens dropped).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }
}
