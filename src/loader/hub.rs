//! Hub ids (`timbrooks/instruct-pix2pix`) through the Hugging Face cache (`HF_HOME`,
//! `HF_HUB_CACHE`), downloading missing files unless offline (`HF_HUB_OFFLINE=1`).

use std::path::{Path, PathBuf};

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
    let required: Vec<&str> = CONFIG_FILES
        .iter()
        .copied()
        .filter(|f| !f.contains("special_tokens"))
        .collect();
    let mut optional: Vec<String> = vec!["tokenizer/special_tokens_map.json".into()];
    optional.extend(weight_files(opts.fp16));
    let optional: Vec<&str> = optional.iter().map(String::as_str).collect();
    resolve_hub_files(repo_id, opts, &required, &optional)
}

/// Returns the snapshot folder of `repo_id` after making sure the `required` files are cached
/// (downloading them unless offline); `optional` files are fetched when the repository has them.
pub fn resolve_hub_files(
    repo_id: &str,
    opts: &HubOptions,
    required: &[&str],
    optional: &[&str],
) -> Result<PathBuf> {
    let Some(first) = required.first() else {
        return Err(Error::Hub("no files asked for".into()));
    };
    let revision = opts.revision.clone().unwrap_or_else(|| "main".into());
    let cache = hf_hub::Cache::from_env();
    let repo = hf_hub::Repo::with_revision(
        repo_id.to_owned(),
        hf_hub::RepoType::Model,
        revision.clone(),
    );
    let cached = cache.repo(repo.clone());
    let offline = opts.offline || env_offline();

    if !offline {
        let api = hf_hub::api::sync::ApiBuilder::from_env()
            .with_progress(true)
            .build()
            .map_err(|e| Error::Hub(e.to_string()))?;
        let remote = api.repo(repo);
        for (f, needed) in required
            .iter()
            .map(|f| (*f, true))
            .chain(optional.iter().map(|f| (*f, false)))
        {
            if cached.get(f).is_some() {
                continue;
            }
            match remote.get(f) {
                Ok(_) => {}
                // Weight variants and optional tokenizer files may legitimately be absent.
                Err(e) if !needed => {
                    tracing::debug!(file = %f, error = %e, "not on the hub");
                }
                Err(e) => return Err(Error::Hub(format!("{repo_id}: downloading {f}: {e}"))),
            }
        }
    }
    let anchor = cached.get(first).ok_or_else(|| {
        if offline {
            Error::Hub(format!(
                "{repo_id} (revision {revision}) is not in the Hugging Face cache and the hub is offline \
                 (HF_HUB_OFFLINE); download it once with a network, or pass a local folder"
            ))
        } else {
            Error::Hub(format!("{repo_id}: {first} could not be fetched"))
        }
    })?;
    // `anchor` is `<snapshot>/<first>`: walk up as many levels as `first` has components.
    let mut root = anchor.clone();
    for _ in Path::new(first).components() {
        root = root
            .parent()
            .map(PathBuf::from)
            .ok_or_else(|| Error::Hub("cache path has no parent".into()))?;
    }
    for f in required {
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
