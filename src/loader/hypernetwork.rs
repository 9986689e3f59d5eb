//! A1111 hypernetworks (`.pt`): for each context width, two small MLPs that rewrite the
//! context an attention layer's keys and values are computed from, exactly as A1111's
//! `modules/hypernetworks/hypernetwork.py` applies them: `k = to_k(h_k(c))`, `v = to_v(h_v(c))`
//! with `h(x) = x + strength · MLP(x)`, in every attention layer whose context width has a
//! pair (self-attention's context is its own input, so it is changed too where the file has
//! that width). The MLP follows the file: `layer_structure`, `activation_func` (after every
//! linear layer but the last unless `activate_output`), `is_layer_norm` (a LayerNorm after
//! each); dropout is inactive at inference. The pickle is read data-only.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::pickle::Object;
use candle_core::{DType, Device, Module, Tensor};

use crate::{Error, Result};

/// `FILE[:STRENGTH]` as the command line takes it (strength 1 when absent).
#[derive(Debug, Clone, PartialEq)]
pub struct HypernetworkSpec {
    pub path: PathBuf,
    pub strength: f64,
}

impl std::str::FromStr for HypernetworkSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        if s.is_empty() {
            return Err("a hypernetwork file is needed".into());
        }
        match s
            .rsplit_once(':')
            .and_then(|(p, x)| Some((p, x.parse::<f64>().ok()?)))
        {
            Some((_, x)) if !x.is_finite() => Err(format!("strength {x} is not finite")),
            Some((p, x)) => Ok(Self {
                path: p.into(),
                strength: x,
            }),
            None => Ok(Self {
                path: s.into(),
                strength: 1.0,
            }),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Act {
    Relu,
    LeakyRelu,
    Elu,
    Hardswish,
    Tanh,
    Sigmoid,
}

impl Act {
    fn parse(name: &str) -> Option<Option<Self>> {
        Some(match name {
            "linear" | "" => None,
            "relu" => Some(Self::Relu),
            "leakyrelu" => Some(Self::LeakyRelu),
            "elu" => Some(Self::Elu),
            // A1111 maps "swish" to torch's Hardswish.
            "swish" | "hardswish" => Some(Self::Hardswish),
            "tanh" => Some(Self::Tanh),
            "sigmoid" => Some(Self::Sigmoid),
            _ => return None,
        })
    }

    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Relu => x.relu(),
            Self::LeakyRelu => {
                let neg = (x.minimum(0.0)? * 0.01)?;
                x.relu()? + neg
            }
            Self::Elu => x.elu(1.0),
            Self::Hardswish => x * ((x + 3.0)?.clamp(0.0, 6.0)? / 6.0)?,
            Self::Tanh => x.tanh(),
            Self::Sigmoid => candle_nn::ops::sigmoid(x),
        }
    }
}

/// `(weight [out, in], bias [out], the LayerNorm (weight, bias) after it)` of each linear layer.
type Linears = Vec<(Tensor, Tensor, Option<(Tensor, Tensor)>)>;

/// One `h(x) = x + strength · MLP(x)`.
#[derive(Debug, Clone)]
pub struct HyperModule {
    linears: Linears,
    act: Option<Act>,
    activate_output: bool,
    strength: f64,
}

impl HyperModule {
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dt = x.dtype();
        let mut y = x.to_dtype(DType::F32)?;
        let n = self.linears.len();
        for (i, (w, b, ln)) in self.linears.iter().enumerate() {
            y = candle_nn::Linear::new(w.clone(), Some(b.clone())).forward(&y)?;
            if let Some(a) = self.act.filter(|_| i + 1 < n || self.activate_output) {
                y = a.apply(&y)?;
            }
            if let Some((lw, lb)) = ln {
                y = candle_nn::LayerNorm::new(lw.clone(), lb.clone(), 1e-5).forward(&y)?;
            }
        }
        (x + (y * self.strength)?.to_dtype(dt)?)?.contiguous()
    }
}

/// The modules of a hypernetwork by context width: `(h_k, h_v)`.
#[derive(Debug, Clone)]
pub struct Hypernetwork {
    pub name: String,
    by_width: HashMap<usize, (HyperModule, HyperModule)>,
}

impl Hypernetwork {
    /// The pair for a context of width `w`, if the file has one.
    pub fn for_width(&self, w: usize) -> Option<&(HyperModule, HyperModule)> {
        self.by_width.get(&w)
    }

    pub fn widths(&self) -> Vec<usize> {
        let mut w: Vec<usize> = self.by_width.keys().copied().collect();
        w.sort_unstable();
        w
    }

    /// Moves the weights to `dev`.
    pub fn to_device(&self, dev: &Device) -> Result<Arc<Self>> {
        let mv = |m: &HyperModule| -> Result<HyperModule> {
            let linears = m
                .linears
                .iter()
                .map(|(w, b, ln)| {
                    let ln = ln
                        .as_ref()
                        .map(|(a, c)| Ok::<_, Error>((a.to_device(dev)?, c.to_device(dev)?)))
                        .transpose()?;
                    Ok((w.to_device(dev)?, b.to_device(dev)?, ln))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(HyperModule {
                linears,
                ..m.clone()
            })
        };
        let by_width = self
            .by_width
            .iter()
            .map(|(w, (k, v))| Ok((*w, (mv(k)?, mv(v)?))))
            .collect::<Result<_>>()?;
        Ok(Arc::new(Self {
            name: self.name.clone(),
            by_width,
        }))
    }
}

fn bad(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::IncompatibleModel(format!("hypernetwork {}: {msg}", path.display()))
}

/// Reads an A1111 hypernetwork file.
pub fn read(spec: &HypernetworkSpec) -> Result<Hypernetwork> {
    let path = &spec.path;
    let root = super::embeddings::pickle_root(path)?;
    super::embeddings::check_globals(path, &root)?;
    let Object::Dict(items) = root else {
        return Err(bad(path, "the pickle does not hold a dictionary"));
    };
    let text = |key: &str| {
        items.iter().find_map(|(k, v)| match (k, v) {
            (Object::Unicode(k), Object::Unicode(v)) if k == key => Some(v.clone()),
            _ => None,
        })
    };
    let flag = |key: &str| {
        items
            .iter()
            .any(|(k, v)| matches!((k, v), (Object::Unicode(k), Object::Bool(true)) if k == key))
    };
    let act_name = text("activation_func").unwrap_or_else(|| "linear".into());
    let act = Act::parse(&act_name.to_lowercase())
        .ok_or_else(|| bad(path, format!("activation `{act_name}` is not supported")))?;
    let mut zip = open_zip(path)?;
    let mut by_width = HashMap::new();
    for (k, v) in &items {
        let (Object::Int(w), Object::List(pair) | Object::Tuple(pair)) = (k, v) else {
            continue;
        };
        let [sk, sv] = pair.as_slice() else {
            return Err(bad(
                path,
                format!("width {w}: {} modules, 2 expected", pair.len()),
            ));
        };
        let mut module = |s: &Object| -> Result<HyperModule> {
            let linears = parse_module(path, &mut zip, s)?;
            Ok(HyperModule {
                linears,
                act,
                activate_output: flag("activate_output"),
                strength: spec.strength,
            })
        };
        let pair = (module(sk)?, module(sv)?);
        by_width.insert(*w as usize, pair);
    }
    if by_width.is_empty() {
        return Err(bad(
            path,
            "no modules (width → [k, v]): not an A1111 hypernetwork",
        ));
    }
    let name = text("name").unwrap_or_else(|| {
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    Ok(Hypernetwork { name, by_width })
}

/// A module's state dict (`linear.{i}.weight`/`bias`): rank-2 weights are linear layers, rank-1
/// ones the LayerNorm that follows the linear layer before them.
fn parse_module(path: &Path, zip: &mut Zip, state: &Object) -> Result<Linears> {
    let Object::Dict(kv) = state else {
        return Err(bad(path, "a module is not a state dict"));
    };
    let mut by_index: std::collections::BTreeMap<usize, (Option<Tensor>, Option<Tensor>)> =
        Default::default();
    for (k, v) in kv {
        let Object::Unicode(k) = k else { continue };
        let Some(rest) = k.strip_prefix("linear.") else {
            continue;
        };
        let Some((i, what)) = rest.split_once('.') else {
            continue;
        };
        let Ok(i) = i.parse::<usize>() else { continue };
        let info = v
            .clone()
            .into_tensor_info(Object::Unicode(k.clone()), Path::new(&zip.dir))
            .map_err(|e| bad(path, e))?
            .ok_or_else(|| bad(path, format!("`{k}` is not a tensor")))?;
        let t = load_tensor(path, zip, &info)?.to_dtype(DType::F32)?;
        let e = by_index.entry(i).or_default();
        match what {
            "weight" => e.0 = Some(t),
            "bias" => e.1 = Some(t),
            _ => {}
        }
    }
    let mut linears: Linears = Vec::new();
    for (i, (w, b)) in by_index {
        let (Some(w), Some(b)) = (w, b) else {
            return Err(bad(path, format!("linear.{i} lacks its weight or bias")));
        };
        match (w.rank(), linears.last_mut()) {
            (2, _) => linears.push((w, b, None)),
            (1, Some(last)) => last.2 = Some((w, b)),
            _ => {
                return Err(bad(
                    path,
                    format!("linear.{i}: unexpected shape {:?}", w.dims()),
                ))
            }
        }
    }
    Ok(linears)
}

struct Zip {
    archive: zip::ZipArchive<std::io::BufReader<std::fs::File>>,
    /// The folder of `data.pkl` inside the zip (tensor paths are relative to it).
    dir: String,
}

fn open_zip(path: &Path) -> Result<Zip> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let archive = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| bad(path, e))?;
    let dir = archive
        .file_names()
        .filter_map(|n| n.ok())
        .find_map(|n| n.strip_suffix(".pkl").map(str::to_owned))
        .ok_or_else(|| bad(path, "no data.pkl inside"))?;
    Ok(Zip { archive, dir })
}

/// A contiguous tensor's data from the zip.
fn load_tensor(
    path: &Path,
    zip: &mut Zip,
    info: &candle_core::pickle::TensorInfo,
) -> Result<Tensor> {
    if !info.layout.is_contiguous() {
        return Err(bad(path, format!("`{}` is not contiguous", info.name)));
    }
    let mut bytes = Vec::new();
    zip.archive
        .by_name(&info.path)
        .map_err(|e| bad(path, e))?
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    let all = Tensor::from_raw_buffer(&bytes, info.dtype, &[info.storage_size], &Device::Cpu)?;
    let shape = info.layout.shape();
    Ok(all
        .narrow(0, info.layout.start_offset(), shape.elem_count())?
        .reshape(shape)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_take_a_strength_after_the_last_colon() {
        let s: HypernetworkSpec = "a/h.pt:0.5".parse().expect("spec");
        assert_eq!((s.path, s.strength), (PathBuf::from("a/h.pt"), 0.5));
        let s: HypernetworkSpec = "h.pt".parse().expect("spec");
        assert_eq!(s.strength, 1.0);
        assert!("h.pt:inf".parse::<HypernetworkSpec>().is_err());
    }
}
