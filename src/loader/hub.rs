//! Hub ids (`timbrooks/instruct-pix2pix`) through the Hugging Face cache (`HF_HOME`,
//! `HF_HUB_CACHE`), downloading missing files unless offline (`HF_HUB_OFFLINE=1`).

use std::path::PathBuf;

use crate::{Error, Result};

/// How to reach the hub.
#[derive(Debug, Clone, Default)]
pub struct HubOptions {
    /// Never touch the network; use only what is cached. Also set by `HF_HUB_OFFLINE=1`.
    pub offline: bool,
    /// A revision (branch, tag or commit); `main` by default.
    pub revision: Option<String>,
    /// Also fetch the fp16 weight variants.
    pub fp16: bool,
}

/// Files a diffusers Stable Diffusion / InstructPix2Pix folder is made of.
const CONFIG_FILES: &[&str] = &[
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
    "unet/config.json",
    "vae/config.json",
];

pub(crate) fn looks_like_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

fn env_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

fn weight_files(fp16: bool) -> Vec<String> {
    let mut v = Vec::new();
    for (comp, stem) in [
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ] {
        if fp16 {
            v.push(format!("{comp}/{stem}.fp16.safetensors"));
        }
        v.push(format!("{comp}/{stem}.safetensors"));
    }
    v
}

/// Returns the snapshot folder of `repo_id` holding a complete diffusers layout.
pub fn resolve_hub(repo_id: &str, opts: &HubOptions) -> Result<PathBuf> {
    let revision = opts.revision.clone().unwrap_or_else(|| "main".into());
    let cache = hf_hub::Cache::from_env();
    let repo = hf_hub::Repo::with_revision(
        repo_id.to_owned(),
        hf_hub::RepoType::Model,
        revision.clone(),
    );
    let cached = cache.repo(repo.clone());
    let offline = opts.offline || env_offline();

    let mut index = cached.get("model_index.json");
    if !offline {
        let api = hf_hub::api::sync::ApiBuilder::from_env()
            .with_progress(true)
            .build()
            .map_err(|e| Error::Hub(e.to_string()))?;
        let remote = api.repo(repo);
        let mut wanted: Vec<String> = CONFIG_FILES.iter().map(|s| s.to_string()).collect();
        wanted.extend(weight_files(opts.fp16));
        for f in &wanted {
            if cached.get(f).is_some() {
                continue;
            }
            match remote.get(f) {
                Ok(_) => {}
                // Weight variants and optional tokenizer files may legitimately be absent.
                Err(e) if f.ends_with(".safetensors") || f.contains("special_tokens") => {
                    tracing::debug!(file = %f, error = %e, "not on the hub");
                }
                Err(e) => return Err(Error::Hub(format!("{repo_id}: downloading {f}: {e}"))),
            }
        }
        index = cached.get("model_index.json");
    }
    let index = index.ok_or_else(|| {
        if offline {
            Error::Hub(format!(
                "{repo_id} (revision {revision}) is not in the Hugging Face cache and the hub is offline \
                 (HF_HUB_OFFLINE); download it once with a network, or pass a local folder"
            ))
        } else {
            Error::Hub(format!("{repo_id}: model_index.json could not be fetched"))
        }
    })?;
    let root = index
        .parent()
        .map(PathBuf::from)
        .ok_or_else(|| Error::Hub("cache path has no parent".into()))?;
    for f in CONFIG_FILES
        .iter()
        .filter(|f| !f.contains("special_tokens"))
    {
        if !root.join(f).is_file() {
            return Err(Error::Hub(format!(
                "{repo_id}: {f} is missing from the cached snapshot {}{}",
                root.display(),
                if offline { " (offline)" } else { "" }
            )));
        }
    }
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids() {
        assert!(looks_like_hub_id("timbrooks/instruct-pix2pix"));
        assert!(looks_like_hub_id("runwayml/stable-diffusion-v1-5"));
        assert!(!looks_like_hub_id("./models/x"));
        assert!(!looks_like_hub_id("/abs/path"));
        assert!(!looks_like_hub_id("a/b/c"));
        assert!(!looks_like_hub_id("noslash"));
    }
}
