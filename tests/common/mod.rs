//! Shared helpers for integration tests: fixture paths, parity cases, tolerance checks.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

/// `../shared/fixtures` next to the project (override with `IP2P_FIXTURES`).
pub fn fixtures() -> PathBuf {
    if let Ok(p) = std::env::var("IP2P_FIXTURES") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures")
}

/// One recorded case: tensors plus JSON-decoded metadata.
pub struct Case {
    pub path: PathBuf,
    pub tensors: HashMap<String, Tensor>,
    pub meta: HashMap<String, serde_json::Value>,
}

impl Case {
    pub fn load(path: &Path) -> Result<Self, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let (_, st_meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut meta = HashMap::new();
        if let Some(m) = st_meta.metadata() {
            for (k, v) in m {
                let parsed = ip2p::loader::parse_json_lenient(v)
                    .unwrap_or_else(|_| serde_json::Value::String(v.clone()));
                meta.insert(k.clone(), parsed);
            }
        }
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
            meta,
        })
    }

    pub fn kind(&self) -> String {
        self.meta_str("kind").unwrap_or_default()
    }

    pub fn t(&self, name: &str) -> Result<&Tensor, String> {
        self.tensors
            .get(name)
            .ok_or_else(|| format!("case has no tensor `{name}`"))
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn meta_str(&self, k: &str) -> Option<String> {
        self.meta.get(k).and_then(|v| v.as_str().map(str::to_owned))
    }

    pub fn meta_f64(&self, k: &str) -> Option<f64> {
        self.meta.get(k).and_then(|v| {
            v.as_f64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        })
    }

    /// The bound `tol.<name>`; `tol("f16.<name>")` reads `tol_f16.<name>`.
    pub fn tol(&self, name: &str) -> Result<f64, String> {
        let key = match name.strip_prefix("f16.") {
            Some(n) => format!("tol_f16.{n}"),
            None => format!("tol.{name}"),
        };
        let t = self.t(&key)?;
        let v = t
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| e.to_string())?;
        v.first()
            .map(|&x| x as f64)
            .ok_or_else(|| format!("empty {key}"))
    }
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64, String> {
    if a.dims() != b.dims() {
        return Err(format!("shape {:?} vs expected {:?}", a.dims(), b.dims()));
    }
    let a = a.to_dtype(DType::F64).map_err(|e| e.to_string())?;
    let b = b.to_dtype(DType::F64).map_err(|e| e.to_string())?;
    let d = (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.to_vec1::<f64>())
        .map_err(|e| e.to_string())?;
    if d.iter().any(|x| x.is_nan()) {
        return Err("NaN in the difference".into());
    }
    Ok(d.into_iter().fold(0.0, f64::max))
}

/// Accumulates named comparisons of one case.
#[derive(Default)]
pub struct Checks {
    pub worst: f64,
    pub worst_ratio: f64,
    pub failures: Vec<String>,
    pub count: usize,
    /// Largest difference in 8-bit levels over `*_u8` checks.
    pub worst_levels: f64,
    /// Half precision: bounds from `tol_f16.<name>` (ten times the reference's own fp16 error),
    /// and only the outputs that have one are compared.
    pub half: bool,
}

impl Checks {
    /// Checks for a run in half precision (`half`) or in f32.
    pub fn new(half: bool) -> Self {
        Self {
            half,
            ..Self::default()
        }
    }

    /// Compares `got` with the case's `name` within `tol.name` (`tol_f16.name` in half
    /// precision, where outputs without such a bound are not compared).
    pub fn within(&mut self, case: &Case, name: &str, got: &Tensor) -> Result<(), String> {
        let want = case.t(name)?;
        let tol = if self.half {
            match case.tol(&format!("f16.{name}")) {
                Ok(t) => t,
                Err(_) => return Ok(()),
            }
        } else {
            case.tol(name)?
        };
        self.bound(name, got, want, tol)
    }

    /// Compares with an explicit bound.
    pub fn bound(
        &mut self,
        name: &str,
        got: &Tensor,
        want: &Tensor,
        tol: f64,
    ) -> Result<(), String> {
        self.count += 1;
        match max_abs_diff(got, want) {
            Ok(err) => {
                if std::env::var_os("IP2P_PARITY_VERBOSE").is_some() {
                    println!(
                        "    {name}: max abs err {err:.3e} (tol {tol:.3e}, ratio {:.3})",
                        err / tol
                    );
                }
                if name.contains("_u8") {
                    self.worst_levels = self.worst_levels.max(err);
                } else {
                    self.worst = self.worst.max(err);
                    self.worst_ratio = self.worst_ratio.max(err / tol);
                }
                if err > tol {
                    self.failures
                        .push(format!("{name}: max abs err {err:.3e} > tol {tol:.3e}"));
                }
            }
            Err(e) => self.failures.push(format!("{name}: {e}")),
        }
        Ok(())
    }
}
