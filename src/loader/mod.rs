//! Loading real checkpoints: diffusers folders, memory-mapped safetensors (fp16 variants widened
//! to the compute dtype), legacy key names (handled by the models), and hub ids through the
//! Hugging Face cache.

pub mod embeddings;
pub(crate) mod hub;
pub mod hypernetwork;
pub mod lora;
pub mod single_file;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

pub use self::hub::{resolve_hub, resolve_hub_files, HubOptions};
use crate::models::nn::Kernels;
use crate::models::{
    AutoencoderKL, ClipTextConfig, ClipTextModel, ClipTokenizer, UNet2DConditionModel, UNetConfig,
    VaeConfig,
};
use crate::schedulers::SchedulerConfig;
use crate::{Error, Result};
use ip2p_cpu::stored::{StoredDType, StoredTensor, StoredWeights, WeightData};

/// Which weight files to prefer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Variant {
    /// The full-precision file if present, otherwise the `fp16` variant.
    #[default]
    Auto,
    /// Only `*.safetensors`.
    Full,
    /// Only `*.fp16.safetensors`.
    Fp16,
}

impl std::str::FromStr for Variant {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Variant::Auto),
            "fp32" | "full" => Ok(Variant::Full),
            "fp16" => Ok(Variant::Fp16),
            o => Err(format!("unknown variant `{o}` (auto, fp32, fp16)")),
        }
    }
}

/// The model used when none is named: the flower-world model trained by this project
/// (`tools/flowers/make.sh`), shipped in the repository's `models/` folder.
pub const BUILTIN_MODEL: &str = "flowers-ip2p";

/// Where [`BUILTIN_MODEL`] is looked for, in order: `models/` of the working directory, of the
/// folders above the running binary (`target/release/ip2p` of a checkout), and of the source
/// tree this library was built from.
fn builtin_candidates() -> Vec<PathBuf> {
    let mut out = vec![Path::new("models").join(BUILTIN_MODEL)];
    if let Ok(exe) = std::env::current_exe() {
        out.extend(
            exe.ancestors()
                .skip(1)
                .take(4)
                .map(|d| d.join("models").join(BUILTIN_MODEL)),
        );
    }
    out.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models")
            .join(BUILTIN_MODEL),
    );
    out
}

/// A diffusers pipeline folder on disk.
#[derive(Debug, Clone)]
pub struct ModelDir {
    root: PathBuf,
}

impl ModelDir {
    /// A local folder, or a hub id (`owner/name`) resolved through the Hugging Face cache.
    pub fn open(spec: &str, hub: &HubOptions) -> Result<Self> {
        let p = Path::new(spec);
        if p.is_dir() {
            return Self::from_dir(p);
        }
        if single_file::is_single_file(p) {
            return Self::from_single_file(p, hub);
        }
        if p.exists() {
            return Err(Error::ModelNotFound(format!(
                "{spec} is a file but not a checkpoint (.ckpt, .safetensors); a diffusers model folder, a single-file checkpoint or a hub id is expected"
            )));
        }
        if hub::looks_like_hub_id(spec) {
            let root = resolve_hub(spec, hub)?;
            return Self::from_dir(&root);
        }
        if spec == BUILTIN_MODEL {
            let looked = builtin_candidates();
            return match looked.iter().find(|c| c.join("model_index.json").is_file()) {
                Some(dir) => Self::from_dir(dir),
                None => Err(Error::ModelNotFound(format!(
                    "the built-in model {BUILTIN_MODEL} ships in the repository's models/ folder; not found in {}: pass --model",
                    looked
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))),
            };
        }
        Err(Error::ModelNotFound(format!(
            "{spec}: no such folder, and not a hub id of the form owner/name"
        )))
    }

    /// A single-file checkpoint, converted once into a diffusers folder kept in the cache
    /// (`$IP2P_CACHE_DIR`, else `$XDG_CACHE_HOME/ip2p` or `~/.cache/ip2p`), keyed by the file's
    /// path, size and modification time.
    pub fn from_single_file(file: &Path, hub: &HubOptions) -> Result<Self> {
        use std::hash::{Hash, Hasher};
        let meta = std::fs::metadata(file).map_err(|e| Error::io(file, e))?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::fs::canonicalize(file)
            .map_err(|e| Error::io(file, e))?
            .hash(&mut h);
        meta.len().hash(&mut h);
        meta.modified().ok().hash(&mut h);
        let stem = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dir = cache_dir()
            .join("single-file")
            .join(format!("{stem}-{:016x}", h.finish()));
        if !dir.join("model_index.json").is_file() {
            let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
            let opts = single_file::ConvertOptions {
                config_from: None,
                hub: hub.clone(),
            };
            single_file::convert(file, &tmp, &opts)?;
            std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))?;
        }
        Self::from_dir(&dir)
    }

    /// A local diffusers folder (must hold `model_index.json`).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.join("model_index.json").is_file() {
            return Err(Error::MissingFile {
                dir: dir.to_path_buf(),
                file: "model_index.json".into(),
            });
        }
        Ok(Self {
            root: dir.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `model_index.json`'s `_class_name`.
    pub fn pipeline_class(&self) -> Result<String> {
        let v: serde_json::Value = read_json(&self.root.join("model_index.json"))?;
        Ok(v.get("_class_name")
            .and_then(|c| c.as_str())
            .unwrap_or("")
            .to_owned())
    }

    fn file(&self, component: &str, name: &str) -> Result<PathBuf> {
        let p = self.root.join(component).join(name);
        if p.is_file() {
            Ok(p)
        } else {
            Err(Error::MissingFile {
                dir: self.root.clone(),
                file: format!("{component}/{name}"),
            })
        }
    }

    /// Parses `<component>/<name>`.
    pub fn config<T: DeserializeOwned>(&self, component: &str, name: &str) -> Result<T> {
        read_json(&self.file(component, name)?)
    }

    /// The weight files of a component (`stem` is `diffusion_pytorch_model` or `model`), honouring
    /// the variant and sharded checkpoints (`*.safetensors.index.json`).
    pub fn weights(&self, component: &str, stem: &str, variant: Variant) -> Result<Vec<PathBuf>> {
        let dir = self.root.join(component);
        let full = format!("{stem}.safetensors");
        let half = format!("{stem}.fp16.safetensors");
        let order: &[&str] = match variant {
            Variant::Auto => &[&full, &half],
            Variant::Full => &[&full],
            Variant::Fp16 => &[&half],
        };
        for name in order {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(vec![p]);
            }
            let index = dir.join(format!("{name}.index.json"));
            if index.is_file() {
                return shards(&index);
            }
        }
        let hint = if dir.join(format!("{stem}.bin")).is_file() {
            " (only a PyTorch .bin file is present; convert it to safetensors)"
        } else {
            ""
        };
        Err(Error::MissingFile {
            dir: self.root.clone(),
            file: format!("{component}/{}{hint}", order.join(" or ")),
        })
    }
}

fn shards(index: &Path) -> Result<Vec<PathBuf>> {
    let v: serde_json::Value = read_json(index)?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::Config {
            path: index.to_path_buf(),
            message: "no weight_map".into(),
        })?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = map
        .values()
        .filter_map(|f| f.as_str())
        .map(|f| dir.join(f))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// Reads and parses a JSON file with errors that name it. Python's non-standard `NaN`,
/// `Infinity` and `-Infinity` (which diffusers writes, e.g. `lambda_min_clipped: -Infinity`)
/// are read as `null`, i.e. the field's default.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let s = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_json_lenient(&s).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Parses JSON, reading Python's `NaN`, `Infinity` and `-Infinity` literals as `null`.
pub fn parse_json_lenient<T: DeserializeOwned>(s: &str) -> serde_json::Result<T> {
    match serde_json::from_str(s) {
        Ok(v) => Ok(v),
        Err(first) => {
            let cleaned = replace_non_finite(s);
            if cleaned == s {
                return Err(first);
            }
            serde_json::from_str(&cleaned)
        }
    }
}

fn replace_non_finite(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_str = false;
    let mut escaped = false;
    let mut rest = s;
    while let Some(c) = rest.chars().next() {
        if in_str {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_str = true;
        }
        let token = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t));
        match token {
            Some(t) => {
                out.push_str("null");
                rest = &rest[t.len()..];
            }
            None => {
                out.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_non_finite_literals_read_as_null() {
        let v: serde_json::Value = parse_json_lenient(
            r#"{"a": -Infinity, "b": [NaN, Infinity], "c": "NaN -Infinity", "d": 1}"#,
        )
        .expect("parses");
        assert!(v["a"].is_null());
        assert!(v["b"][0].is_null() && v["b"][1].is_null());
        assert_eq!(v["c"], "NaN -Infinity");
        assert_eq!(v["d"], 1);
        assert!(parse_json_lenient::<serde_json::Value>("{bad").is_err());
    }
}

/// Where ip2p keeps what it derives from models (converted single files).
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("IP2P_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("ip2p");
    }
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/ip2p"))
        .unwrap_or_else(|| std::env::temp_dir().join("ip2p-cache"))
}

/// Memory-maps safetensors files into a `VarBuilder` producing `dtype` tensors on `device`.
pub fn var_builder(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    let st = map(files)?;
    Ok(VarBuilder::from_backend(
        Box::new(Widening(st, Deltas::default())),
        dtype,
        device.clone(),
    ))
}

#[allow(unsafe_code)] // named exception: memory-mapped checkpoints (see lib.rs)
fn map(files: &[PathBuf]) -> Result<Arc<MmapedSafetensors>> {
    for f in files {
        if !f.is_file() {
            return Err(Error::ModelNotFound(format!(
                "{} does not exist",
                f.display()
            )));
        }
    }
    // SAFETY: the files are mapped read-only. Modifying or truncating them while the model is
    // loaded is undefined behaviour, as for every memory-mapped checkpoint; we never write to them.
    Ok(Arc::new(unsafe { MmapedSafetensors::multi(files) }?))
}

/// Builds a model with `build` from the weights in safetensors `files`: as [`var_builder`],
/// and with the layers that keep only a packed copy of their weights (convolutions and linear
/// layers on the CPU) packing straight from the mapped bytes ([`crate::models::stored`]), so no
/// widened f32 copy of those weights is ever made. The outer error is the files' (missing,
/// unreadable); the inner one is `build`'s, for the caller to put in its own context.
pub fn build_from_files<T>(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
    build: impl Fn(VarBuilder<'static>) -> candle_core::Result<T>,
) -> Result<std::result::Result<T, candle_core::Error>> {
    let kernels = crate::models::nn::Kernels::current();
    build_cached(
        files,
        dtype,
        device,
        kernels,
        None,
        &Deltas::default(),
        build,
    )
}

/// As [`build_from_files`], with the packed weights kept in `cache = (dir, name)`: replayed
/// (memory-mapped) from `dir/name-<key>.ip2p-packed` when that file matches, else computed and
/// written there for the next start. The key covers the weight files (path, size, modification
/// time), this build of ip2p and the CPU's packing layout, so a changed model or program
/// writes a new file. A cache that cannot be written only costs the write; one that does not
/// match what the model packs is removed and the model built again without it.
fn build_cached<T>(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
    kernels: Kernels,
    cache: Option<(&Path, &str)>,
    deltas: &Deltas,
    build: impl Fn(VarBuilder<'static>) -> candle_core::Result<T>,
) -> Result<std::result::Result<T, candle_core::Error>> {
    use crate::models::nn::BuildMode;
    use ip2p_cpu::stored::PackCache;
    let st = map(files)?;
    let run = |cache: Option<Arc<PackCache>>| {
        let vb = VarBuilder::from_backend(
            Box::new(Widening(st.clone(), deltas.clone())),
            dtype,
            device.clone(),
        );
        let stored: Arc<dyn StoredWeights> = Arc::new(Mapped(st.clone(), deltas.clone()));
        // A whole mode, not the current one changed: the loaders run at once on rayon's
        // threads, and one may start on a thread that waits inside another's UNet level built
        // for large maps.
        BuildMode {
            kernels,
            source: Some(stored),
            cache,
            ..BuildMode::default()
        }
        .scope(|| build(vb))
    };
    let packs = dtype == DType::F32 && device.is_cpu() && kernels == Kernels::Auto;
    if cache.is_some() && !packs {
        tracing::warn!(
            device = ?device, ?dtype, %kernels,
            "the packed-weight cache holds the CPU's f32 fused kernels' weights only: not used here"
        );
    }
    if cache.is_some() && packs && !deltas.is_empty() {
        tracing::info!("a LoRA changes the weights: the packed-weight cache is not used");
    }
    let Some((dir, name)) = cache.filter(|_| packs && deltas.is_empty()) else {
        return Ok(run(None));
    };
    let (which, key) = match cache_key(files) {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!("packed-weight cache: {e}; loading without it");
            return Ok(run(None));
        }
    };
    // `which` names the weight files, `key` also their versions: a new version's cache
    // replaces the old one's.
    let stem = format!("{name}-{which:016x}-");
    let file = dir.join(format!("{stem}{key:016x}.ip2p-packed"));
    if let Some(built) = replay_cache(&file, &run) {
        return Ok(built);
    }
    Ok(record_cache(dir, &stem, &file, &run))
}

/// The model built with its packed weights mapped from `file`, if that cache exists and holds
/// what the model packs; a damaged one is removed (`None`: build and record it again).
fn replay_cache<T>(
    file: &Path,
    run: &impl Fn(Option<Arc<ip2p_cpu::stored::PackCache>>) -> candle_core::Result<T>,
) -> Option<candle_core::Result<T>> {
    let c = Arc::new(ip2p_cpu::stored::PackCache::open(file)?);
    let built = run(Some(c.clone()));
    match (built, finish_cache(c)) {
        (Ok(m), Ok(())) => Some(Ok(m)),
        (Err(e), _) => Some(Err(e)),
        (Ok(_), Err(e)) => {
            tracing::warn!("packed-weight cache {}: {e}; rebuilding it", file.display());
            let _ = std::fs::remove_file(file);
            None
        }
    }
}

/// The model built while its packed weights are recorded into a temporary file, renamed to
/// `file` once complete (older versions' caches removed then). A cache that cannot be written
/// only costs the write.
fn record_cache<T>(
    dir: &Path,
    stem: &str,
    file: &Path,
    run: &impl Fn(Option<Arc<ip2p_cpu::stored::PackCache>>) -> candle_core::Result<T>,
) -> candle_core::Result<T> {
    remove_orphans(dir, stem);
    let tmp = file.with_extension(format!("tmp{}", std::process::id()));
    let rec = std::fs::create_dir_all(dir).and_then(|()| ip2p_cpu::stored::PackCache::create(&tmp));
    let rec = match rec {
        Ok(c) => Some(Arc::new(c)),
        Err(e) => {
            tracing::warn!("packed-weight cache {}: not written: {e}", file.display());
            None
        }
    };
    let built = run(rec.clone());
    let Some(c) = rec else { return built };
    let done = if built.is_ok() {
        finish_cache(c)
            .and_then(|()| crate::fsutil::rename_durably(&tmp, file).map_err(std::io::Error::other))
    } else {
        Err(std::io::Error::other("the model did not build"))
    };
    match done {
        Ok(()) => {
            tracing::info!("packed-weight cache written: {}", file.display());
            remove_stale(dir, stem, file);
        }
        Err(e) => {
            tracing::warn!("packed-weight cache {}: not written: {e}", file.display());
            let _ = std::fs::remove_file(&tmp);
        }
    }
    built
}

/// Closes a cache once the model is built (the model holds its own references to a replayed
/// map; the cache's are released here).
fn finish_cache(c: Arc<ip2p_cpu::stored::PackCache>) -> std::io::Result<()> {
    Arc::try_unwrap(c)
        .map_err(|_| std::io::Error::other("the cache is still in use"))
        .and_then(ip2p_cpu::stored::PackCache::finish)
}

/// Which weight files a packed-weight cache is for (their paths), and everything it depends on:
/// also their sizes and modification times, this build and the packing layout.
fn cache_key(files: &[PathBuf]) -> std::io::Result<(u64, u64)> {
    use std::hash::{Hash, Hasher};
    let (mut which, mut key) = (
        std::collections::hash_map::DefaultHasher::new(),
        std::collections::hash_map::DefaultHasher::new(),
    );
    env!("CARGO_PKG_VERSION").hash(&mut key);
    ip2p_cpu::sgemm::layout_key().hash(&mut key);
    for f in files {
        let meta = std::fs::metadata(f)?;
        let path = std::fs::canonicalize(f)?;
        path.hash(&mut which);
        path.hash(&mut key);
        meta.len().hash(&mut key);
        meta.modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .hash(&mut key);
    }
    Ok((which.finish(), key.finish()))
}

/// Removes the caches in `dir` for the same weight files (`stem…`) other than `keep`.
fn remove_stale(dir: &Path, stem: &str, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for p in entries.flatten().map(|e| e.path()) {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if p != keep && name.starts_with(stem) && name.ends_with(".ip2p-packed") {
            match std::fs::remove_file(&p) {
                Ok(()) => tracing::info!("stale packed-weight cache removed: {}", p.display()),
                Err(e) => tracing::warn!("stale packed-weight cache {}: {e}", p.display()),
            }
        }
    }
}

/// Removes temporary caches for the same weight files (`stem….tmp<pid>`) whose writer is gone
/// (killed while writing: several gigabytes each for SD 1.5). Where it cannot tell whether a
/// process runs (no `/proc`), it leaves them.
fn remove_orphans(dir: &Path, stem: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let alive = |pid: u32| {
        let proc = Path::new("/proc");
        !proc.is_dir() || pid == std::process::id() || proc.join(pid.to_string()).exists()
    };
    for p in entries.flatten().map(|e| e.path()) {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let pid = name
            .strip_prefix(stem)
            .and_then(|rest| rest.rsplit_once(".tmp"))
            .and_then(|(_, pid)| pid.parse::<u32>().ok());
        if pid.is_some_and(|pid| !alive(pid)) {
            match std::fs::remove_file(&p) {
                Ok(()) => tracing::info!("orphaned packed-weight cache removed: {}", p.display()),
                Err(e) => tracing::warn!("orphaned packed-weight cache {}: {e}", p.display()),
            }
        }
    }
}

/// Mapped safetensors as [`StoredWeights`]: f32, f16 and bf16 tensors, read in place.
struct Mapped(Arc<MmapedSafetensors>, Deltas);

impl StoredWeights for Mapped {
    fn tensor(&self, name: &str) -> Option<StoredTensor<'_>> {
        if self.1.contains_key(name) {
            // Changed by a LoRA: read (and patched) through the VarBuilder instead.
            return None;
        }
        let view = self.0.get(name).ok()?;
        let dtype = match DType::try_from(view.dtype()).ok()? {
            DType::F32 => StoredDType::F32,
            DType::F16 => StoredDType::F16,
            DType::BF16 => StoredDType::BF16,
            _ => return None,
        };
        Some(StoredTensor {
            shape: view.shape().to_vec(),
            data: WeightData::new(view.data(), dtype).ok()?,
        })
    }
}

/// Memory-mapped safetensors that widen half-precision weights to f32 on the CPU straight from
/// the mapped bytes, in parallel (candle's own path copies, then widens on one core); every
/// other case goes through candle.
struct Widening(Arc<MmapedSafetensors>, Deltas);

/// Weight deltas (LoRA) added to tensors as they are read, by tensor name.
type Deltas = Arc<HashMap<String, candle_core::Tensor>>;

impl Widening {
    /// `name` from the files: half-precision widened in parallel on the CPU.
    fn read(
        &self,
        name: &str,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        use rayon::prelude::*;
        let view = self.0.get(name)?;
        let half = match DType::try_from(view.dtype()) {
            Ok(DType::F16) => Some(false),
            Ok(DType::BF16) => Some(true),
            _ => None,
        };
        if let (Some(bf), DType::F32, true) = (half, dtype, dev.is_cpu()) {
            let bytes = view.data();
            let mut out = vec![0f32; bytes.len() / 2];
            out.par_chunks_mut(1 << 15)
                .zip(bytes.par_chunks(1 << 16))
                .for_each(|(o, b)| {
                    for (o, c) in o.iter_mut().zip(b.chunks_exact(2)) {
                        let bits = u16::from_le_bytes([c[0], c[1]]);
                        *o = if bf {
                            half::bf16::from_bits(bits).to_f32()
                        } else {
                            half::f16::from_bits(bits).to_f32()
                        };
                    }
                });
            return candle_core::Tensor::from_vec(out, view.shape(), dev);
        }
        self.0.load(name, dev)?.to_dtype(dtype)
    }

    /// `name` as read, plus its delta if it has one (added in f32, then cast to `dtype`).
    fn patched(
        &self,
        name: &str,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        let Some(d) = self.1.get(name) else {
            return self.read(name, dtype, dev);
        };
        let t = self.read(name, DType::F32, dev)?;
        if d.elem_count() != t.elem_count() {
            candle_core::bail!(
                "LoRA delta for `{name}` has shape {:?}; the weight has {:?}",
                d.dims(),
                t.dims()
            );
        }
        let d = d.reshape(t.shape())?.to_device(dev)?;
        (t + d)?.to_dtype(dtype)
    }
}

impl candle_nn::var_builder::SimpleBackend for Widening {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: t.shape().clone(),
            }
            .bt());
        }
        Ok(t)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        self.patched(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.get(name).is_ok()
    }
}

/// Everything needed to run Stable Diffusion or InstructPix2Pix.
#[derive(Debug, Clone)]
pub struct Components {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub vae: AutoencoderKL,
    pub unet: UNet2DConditionModel,
    pub scheduler: SchedulerConfig,
    pub device: Device,
    pub dtype: DType,
}

/// Options for [`load`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub variant: Variant,
    /// The UNet's weights variant, if it should differ from `variant`.
    pub unet_variant: Option<Variant>,
    /// Defaults to the device's compute dtype.
    pub dtype: Option<DType>,
    /// A folder for caches of packed weights (CPU, f32): the first load writes one file per
    /// network (as large as the model in f32 and Winograd form, about 5 GB for SD 1.5), later
    /// loads map it instead of packing, which makes a start several times faster, the most
    /// on virtual machines that take freed memory back. `None`: no cache. Ignored (with a
    /// warning) on a GPU, in half precision and with generic kernels.
    pub packed_cache: Option<PathBuf>,
    /// The fused CPU kernels where they apply, or candle's generic ops only (the graph a GPU
    /// runs).
    pub kernels: Kernels,
    /// LoRA files (diffusers/PEFT or kohya), each with its scale, added to the UNet's and the
    /// text encoder's weights as they load.
    pub loras: Vec<lora::LoraSpec>,
    /// Textual Inversion embeddings bound to their trigger words, in order.
    pub embeddings: Vec<embeddings::EmbeddingSpec>,
    /// An A1111 hypernetwork and its strength, applied to the UNet's attention layers.
    pub hypernetwork: Option<hypernetwork::HypernetworkSpec>,
}

fn with_context<T>(r: candle_core::Result<T>, what: &str, dir: &Path) -> Result<T> {
    r.map_err(|e| Error::IncompatibleModel(format!("{what} in {}: {e}", dir.display())))
}

/// What a network is built for: its dtype and device, the kernels its layers take and the
/// packed-weight cache folder (if any).
#[derive(Debug, Clone, Copy)]
struct Target<'a> {
    dtype: DType,
    device: &'a Device,
    kernels: Kernels,
    cache: Option<&'a Path>,
    /// LoRA deltas by network.
    deltas: Option<&'a HashMap<lora::Net, Deltas>>,
}

impl<'a> Target<'a> {
    /// Built as the calling thread's [`crate::models::nn::build_with_kernels`] says, no cache.
    fn plain(dtype: DType, device: &'a Device) -> Self {
        Self {
            dtype,
            device,
            kernels: Kernels::current(),
            cache: None,
            deltas: None,
        }
    }
}

/// The CLIP text encoder of a diffusers folder.
pub fn load_text_encoder(
    dir: &ModelDir,
    variant: Variant,
    dtype: DType,
    device: &Device,
) -> Result<ClipTextModel> {
    text_encoder(dir, variant, Target::plain(dtype, device))
}

/// The VAE of a diffusers folder.
pub fn load_vae(
    dir: &ModelDir,
    variant: Variant,
    dtype: DType,
    device: &Device,
) -> Result<AutoencoderKL> {
    vae(dir, variant, Target::plain(dtype, device))
}

fn text_encoder(dir: &ModelDir, v: Variant, t: Target) -> Result<ClipTextModel> {
    let cfg: ClipTextConfig = dir.config("text_encoder", "config.json")?;
    load_part(dir, "text_encoder", "model", v, t, |vb| {
        ClipTextModel::new(vb, &cfg)
    })
}

fn vae(dir: &ModelDir, v: Variant, t: Target) -> Result<AutoencoderKL> {
    let cfg: VaeConfig = dir.config("vae", "config.json")?;
    load_part(dir, "vae", "diffusion_pytorch_model", v, t, |vb| {
        AutoencoderKL::new(vb, &cfg)
    })
}

/// One network of a diffusers folder, `component/stem.safetensors`, built by `build` for
/// `target` (see [`build_cached`]).
fn load_part<T>(
    dir: &ModelDir,
    component: &str,
    stem: &str,
    variant: Variant,
    target: Target,
    build: impl Fn(VarBuilder<'static>) -> candle_core::Result<T>,
) -> Result<T> {
    let net = match component {
        "unet" => Some(lora::Net::Unet),
        "text_encoder" => Some(lora::Net::TextEncoder),
        _ => None,
    };
    let none = Deltas::default();
    let deltas = net
        .and_then(|n| target.deltas.and_then(|d| d.get(&n)))
        .unwrap_or(&none);
    let built = build_cached(
        &dir.weights(component, stem, variant)?,
        target.dtype,
        target.device,
        target.kernels,
        target.cache.map(|c| (c, component)),
        deltas,
        build,
    )?;
    with_context(built, component, dir.root())
}

/// Loads a tokenizer, text encoder, VAE, UNet and scheduler config from a diffusers folder.
pub fn load(dir: &ModelDir, device: &Device, opts: &LoadOptions) -> Result<Components> {
    let dtype = opts
        .dtype
        .unwrap_or_else(|| crate::device::compute_dtype(device));
    let root = dir.root();
    let mut tokenizer = ClipTokenizer::from_dir(&root.join("tokenizer"))?;
    let deltas = lora_deltas(dir, opts)?;
    let target = Target {
        dtype,
        device,
        kernels: opts.kernels,
        cache: opts.packed_cache.as_deref(),
        deltas: Some(&deltas),
    };
    // The three networks load at once (reading, widening and packing their weights).
    let (unet, (text_encoder, vae)) = rayon::join(
        || load_unet(dir, opts, target),
        || {
            rayon::join(
                || text_encoder(dir, opts.variant, target),
                || vae(dir, opts.variant, target),
            )
        },
    );
    let (mut unet, mut text_encoder, vae) = (unet?, text_encoder?, vae?);
    if let Some(spec) = &opts.hypernetwork {
        let h = hypernetwork::read(spec)?;
        tracing::info!(hypernetwork = %spec.path.display(), widths = ?h.widths(), strength = spec.strength, "hypernetwork applied");
        unet.set_hypernetwork(Some(h.to_device(device)?));
    }
    for spec in &opts.embeddings {
        let emb = embeddings::read(spec)?;
        add_embedding(&mut tokenizer, &mut text_encoder, &emb)?;
    }

    let scheduler: SchedulerConfig = dir.config("scheduler", "scheduler_config.json")?;
    Ok(Components {
        tokenizer,
        text_encoder,
        vae,
        unet,
        scheduler,
        device: device.clone(),
        dtype,
    })
}

/// The weight deltas of `opts.loras` for the UNet and the text encoder, matched against the
/// tensor names of their weight files.
fn lora_deltas(dir: &ModelDir, opts: &LoadOptions) -> Result<HashMap<lora::Net, Deltas>> {
    if opts.loras.is_empty() {
        return Ok(HashMap::new());
    }
    let names = |component: &str, stem: &str, v: Variant| -> Result<Vec<String>> {
        let st = map(&dir.weights(component, stem, v)?)?;
        Ok(st.tensors().into_iter().map(|(n, _)| n).collect())
    };
    let unet_variant = opts.unet_variant.unwrap_or(opts.variant);
    let all = HashMap::from([
        (
            lora::Net::Unet,
            names("unet", "diffusion_pytorch_model", unet_variant)?,
        ),
        (
            lora::Net::TextEncoder,
            names("text_encoder", "model", opts.variant)?,
        ),
    ]);
    let plan = lora::plan(&opts.loras, &all)?;
    for spec in &opts.loras {
        tracing::info!(lora = %spec.path.display(), scale = spec.scale, "LoRA applied");
    }
    Ok(plan.into_iter().map(|(n, d)| (n, Arc::new(d))).collect())
}

/// A copy of the model folder `dir` in `dst` with `loras` folded into the UNet's and the text
/// encoder's weights exactly as [`load`] folds them (each weight read in f32 plus its delta),
/// written in f32 under the files' own tensor names; everything else is linked or copied.
/// `ip2p train --lora` trains from such a folder, so its checkpoints carry the text encoder's
/// part of the LoRA too.
pub fn bake_loras(dir: &ModelDir, loras: &[lora::LoraSpec], dst: &Path) -> Result<()> {
    let opts = LoadOptions {
        loras: loras.to_vec(),
        ..Default::default()
    };
    let deltas = lora_deltas(dir, &opts)?;
    let root = dir.root();
    crate::fsutil::commit_dir(dst, |tmp| {
        crate::fsutil::copy_tree(root, tmp, true, &["unet", "text_encoder"])?;
        for (net, component, stem) in [
            (lora::Net::Unet, "unet", "diffusion_pytorch_model"),
            (lora::Net::TextEncoder, "text_encoder", "model"),
        ] {
            let weights = dir.weights(component, stem, opts.variant)?;
            let src = root.join(component);
            let skip: Vec<String> = std::fs::read_dir(&src)
                .map_err(|e| Error::io(&src, e))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(stem))
                .collect();
            let skip: Vec<&str> = skip.iter().map(String::as_str).collect();
            crate::fsutil::copy_tree(&src, &tmp.join(component), true, &skip)?;
            let empty = Arc::new(HashMap::new());
            let read = Widening(map(&weights)?, deltas.get(&net).cloned().unwrap_or(empty));
            let names: Vec<String> = read.0.tensors().into_iter().map(|(n, _)| n).collect();
            let mut out = HashMap::new();
            for n in names {
                let t = read.patched(&n, DType::F32, &Device::Cpu)?;
                out.insert(n, t);
            }
            let file = tmp.join(component).join(format!("{stem}.safetensors"));
            candle_core::safetensors::save(&out, &file)?;
        }
        Ok(())
    })
}

/// Binds a Textual Inversion embedding: its tokens added to the tokenizer, its vectors to the
/// text encoder's table at their ids.
pub fn add_embedding(
    tokenizer: &mut ClipTokenizer,
    text_encoder: &mut ClipTextModel,
    emb: &embeddings::Embedding,
) -> Result<()> {
    let width = emb.vectors.dim(1)?;
    let hidden = text_encoder.config().hidden_size;
    if width != hidden {
        return Err(Error::IncompatibleModel(format!(
            "embedding {}: vectors of width {width}, but this text encoder's is {hidden} (made for another model)",
            emb.path.display()
        )));
    }
    let first = tokenizer.vocab_len();
    let tokens = emb.tokens()?;
    let ids = tokenizer.add_embedding_tokens(&tokens)?;
    if ids.first().map(|&i| i as usize) != Some(first) {
        return Err(Error::Tokenizer(format!(
            "embedding {}: its tokens got ids {ids:?}, not {first}…",
            emb.path.display()
        )));
    }
    text_encoder.add_token_embeddings(first, &emb.vectors)?;
    tracing::info!(embedding = %emb.path.display(), tokens = ?tokens, "Textual Inversion embedding bound");
    Ok(())
}

fn load_unet(dir: &ModelDir, opts: &LoadOptions, target: Target) -> Result<UNet2DConditionModel> {
    let root = dir.root();
    let unet_cfg: UNetConfig = dir.config("unet", "config.json")?;
    unet_cfg.validate().map_err(|m| Error::Config {
        path: root.join("unet/config.json"),
        message: m,
    })?;
    let variant = opts.unet_variant.unwrap_or(opts.variant);
    load_part(
        dir,
        "unet",
        "diffusion_pytorch_model",
        variant,
        target,
        |vb| UNet2DConditionModel::new(vb, &unet_cfg),
    )
}
