//! Helpers for dataset-gen's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::Device;
use dataset_gen::output::{read_part, StoredRow};
use dataset_gen::render::{FilterConfig, ImageConfig};
use dataset_gen::run::RunConfig;
use ip2p::loader::HubOptions;

/// `../shared/fixtures` beside the project (override with `IP2P_FIXTURES`).
pub fn fixtures() -> PathBuf {
    if let Ok(p) = std::env::var("IP2P_FIXTURES") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures")
}

/// Small, fast image settings on the tiny models: filter thresholds that random weights pass
/// (they are set per test where the filter itself is under test).
pub fn tiny_image_config() -> ImageConfig {
    ImageConfig {
        width: 64,
        height: 64,
        steps: 6,
        samples: 3,
        keep: 2,
        filter: FilterConfig {
            min_image_image: -1.0,
            min_direction: -1.0,
            min_image_text: -1.0,
        },
        seed: 42,
        ..Default::default()
    }
}

pub fn run_config(inputs: Vec<PathBuf>, out: &Path) -> RunConfig {
    RunConfig {
        inputs,
        caption_column: None,
        limit: None,
        out: out.to_path_buf(),
        shard: 0,
        num_shards: 1,
        items_per_part: 2,
        llm: None,
        llm_concurrency: 4,
        model: fixtures().join("tiny-sd").display().to_string(),
        loras: Vec::new(),
        embeddings: Vec::new(),
        hypernetwork: None,
        clip: fixtures().join("tiny-clip").display().to_string(),
        hub: HubOptions {
            offline: true,
            ..Default::default()
        },
        device: Device::Cpu,
        image: tiny_image_config(),
        progress_bars: false,
        world: None,
    }
}

/// Every Parquet file under `out/data`, sorted by name.
pub fn part_files(out: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(out.join("data"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    v.retain(|p| p.extension().is_some_and(|e| e == "parquet"));
    v.sort();
    v
}

/// The bytes of every Parquet file under `out/data`, in name order.
pub fn part_bytes(out: &Path) -> Vec<Vec<u8>> {
    part_files(out)
        .iter()
        .map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .collect()
}

/// All rows of a dataset folder, file by file.
pub fn all_rows(out: &Path) -> Vec<StoredRow> {
    part_files(out)
        .iter()
        .flat_map(|p| read_part(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .collect()
}

/// A Python with pyarrow, if the environment names one (`IP2P_PYTHON`; CI sets it).
pub fn python() -> Option<PathBuf> {
    std::env::var_os("IP2P_PYTHON").map(PathBuf::from)
}

pub fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}
