//! LoRA files: the diffusers/PEFT format (`unet.<module>.lora_A.weight` / `lora_B.weight`,
//! `text_encoder.<module>…`, scale `alpha / r` from the metadata), the older diffusers names
//! (`lora.down` / `lora.up`), and the kohya/A1111 format (`lora_unet_<module>` /
//! `lora_te_<module>` with the module path's dots as underscores, `lora_down` / `lora_up`,
//! a per-module `alpha`; LoCon adapters on convolutions too).
//!
//! [`plan`] turns any number of files, each with its own scale, into one weight delta per
//! changed tensor (`scale · alpha / r · up · down`), which the loader adds as it reads the
//! weights — before they are packed, so a LoRA costs nothing at inference. A kohya module
//! name is matched against the model's own tensor names (an underscore name is ambiguous
//! otherwise), and an adapter that matches no layer is an error that says how many did.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::models::nn::Lora;
use crate::models::UNet2DConditionModel;
use crate::{Error, Result};

/// The file name diffusers uses.
pub const LORA_FILE: &str = "pytorch_lora_weights.safetensors";

/// Adapters by module path: `(A, B)`.
pub type Adapters = HashMap<String, (Tensor, Tensor)>;

/// Reads a LoRA file: adapters by module path, and the scale (`alpha / r` from the metadata,
/// else 1 as diffusers' scripts train with `alpha = r`).
pub fn read(path: &Path) -> Result<(Adapters, f64)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::IncompatibleModel(format!("{}: {e}", path.display())))?;
    let mut scale = 1.0;
    if let Some(m) = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("lora_adapter_metadata"))
    {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(m) {
            if let (Some(r), Some(a)) = (v["unet.r"].as_f64(), v["unet.lora_alpha"].as_f64()) {
                if r > 0.0 {
                    scale = a / r;
                }
            }
        }
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
    let mut out: HashMap<String, (Option<Tensor>, Option<Tensor>)> = HashMap::new();
    for (k, t) in tensors {
        let k = k.strip_prefix("unet.").unwrap_or(&k).to_owned();
        // PEFT (`lora_A`/`lora_B`) and the older diffusers names (`lora.down`/`lora.up`).
        let (module, is_a) = if let Some(m) = k.strip_suffix(".lora_A.weight") {
            (m.to_owned(), true)
        } else if let Some(m) = k.strip_suffix(".lora_B.weight") {
            (m.to_owned(), false)
        } else if let Some(m) = k.strip_suffix(".lora.down.weight") {
            (
                m.replace(".processor", "")
                    .replace("to_out_lora", "to_out.0"),
                true,
            )
        } else if let Some(m) = k.strip_suffix(".lora.up.weight") {
            (
                m.replace(".processor", "")
                    .replace("to_out_lora", "to_out.0"),
                false,
            )
        } else {
            continue;
        };
        let e = out.entry(module).or_default();
        if is_a {
            e.0 = Some(t);
        } else {
            e.1 = Some(t);
        }
    }
    let mut pairs = HashMap::new();
    for (m, (a, b)) in out {
        match (a, b) {
            (Some(a), Some(b)) => {
                pairs.insert(m, (a, b));
            }
            _ => {
                return Err(Error::IncompatibleModel(format!(
                    "{}: {m} has only half of its adapter",
                    path.display()
                )))
            }
        }
    }
    Ok((pairs, scale))
}

/// Folds a LoRA file into the UNet's weights. Returns how many projections changed; an
/// adapter for a module the UNet does not have is an error.
pub fn merge_file(unet: &mut UNet2DConditionModel, path: &Path) -> Result<usize> {
    let (mut pairs, scale) = read(path)?;
    let mut n = 0;
    let mut err = None;
    unet.visit_attention_projections(&mut |p, lin| {
        if let Some((a, b)) = pairs.remove(p) {
            let r = (|| -> Result<()> {
                let dev = lin.device().clone();
                let l = Lora {
                    a: a.to_device(&dev)?.to_dtype(DType::F32)?,
                    b: b.to_device(&dev)?.to_dtype(DType::F32)?,
                    scale,
                };
                lin.merge_lora(&l)?;
                Ok(())
            })();
            match r {
                Ok(()) => n += 1,
                Err(e) => err = Some(e),
            }
        }
    });
    if let Some(e) = err {
        return Err(e);
    }
    if let Some(k) = pairs.keys().next() {
        return Err(Error::IncompatibleModel(format!(
            "{}: the UNet has no attention projection {k}",
            path.display()
        )));
    }
    Ok(n)
}

/// `FILE[:SCALE]` as the command line takes it (scale 1 when absent).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub path: std::path::PathBuf,
    pub scale: f64,
}

impl std::str::FromStr for LoraSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        if s.is_empty() {
            return Err("a LoRA file is needed".into());
        }
        if let Some((p, x)) = s.rsplit_once(':') {
            if let Ok(scale) = x.parse::<f64>() {
                if !scale.is_finite() {
                    return Err(format!("LoRA scale {x} is not a finite number"));
                }
                return Ok(Self {
                    path: p.into(),
                    scale,
                });
            }
        }
        Ok(Self {
            path: s.into(),
            scale: 1.0,
        })
    }
}

/// Which network an adapter changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Net {
    Unet,
    TextEncoder,
}

/// A module as a file names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Name {
    /// diffusers/PEFT: the module path with dots.
    Dotted(String),
    /// kohya: the module path with dots as underscores.
    Underscored(String),
}

/// One adapter: `W += s · up · down`, `s = alpha / rank` (or the file's PEFT scale).
#[derive(Debug, Default)]
struct Parts {
    down: Option<Tensor>,
    up: Option<Tensor>,
    alpha: Option<f64>,
}

/// A file's adapters by network and module.
type FileAdapters = HashMap<(Net, Name), Parts>;

/// Every adapter of a file, by network and module, and the scale of those without an alpha.
fn read_any(path: &Path) -> Result<(FileAdapters, f64)> {
    let bad = |m: String| Error::IncompatibleModel(format!("LoRA {}: {m}", path.display()));
    let (_, peft_scale) = read_meta(path)?;
    let tensors =
        candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| bad(e.to_string()))?;
    let mut out: HashMap<(Net, Name), Parts> = HashMap::new();
    for (k, t) in tensors {
        let Some((net, name, part)) = classify(&k) else {
            continue;
        };
        let e = out.entry((net, name)).or_default();
        match part {
            Part::Down => e.down = Some(t),
            Part::Up => e.up = Some(t),
            Part::Alpha => {
                e.alpha = Some(
                    t.to_dtype(DType::F64)?
                        .flatten_all()?
                        .to_vec1::<f64>()?
                        .first()
                        .copied()
                        .unwrap_or(0.0),
                )
            }
            Part::Mid => {
                return Err(bad(format!(
                    "{k}: LoCon's Tucker `lora_mid` is not supported"
                )))
            }
        }
    }
    if out.is_empty() {
        return Err(bad(
            "no LoRA tensors (PEFT `lora_A`/`lora_B`, kohya `lora_down`/`lora_up`)".into(),
        ));
    }
    Ok((out, peft_scale))
}

enum Part {
    Down,
    Up,
    Alpha,
    Mid,
}

/// Network, module and part of a tensor name in any of the formats (`None`: not an adapter).
fn classify(k: &str) -> Option<(Net, Name, Part)> {
    for (prefix, net) in [("lora_unet_", Net::Unet), ("lora_te_", Net::TextEncoder)] {
        if let Some(rest) = k.strip_prefix(prefix) {
            let (module, part) = rest.split_once('.')?;
            let part = match part {
                "lora_down.weight" => Part::Down,
                "lora_up.weight" => Part::Up,
                "alpha" => Part::Alpha,
                "lora_mid.weight" => Part::Mid,
                _ => return None,
            };
            return Some((net, Name::Underscored(module.to_owned()), part));
        }
    }
    let (net, k) = if let Some(r) = k.strip_prefix("text_encoder.") {
        (Net::TextEncoder, r)
    } else {
        (Net::Unet, k.strip_prefix("unet.").unwrap_or(k))
    };
    let old = |m: &str| {
        m.replace(".processor", "")
            .replace("to_out_lora", "to_out.0")
    };
    let old = |m: &str| old(m).replace("_lora", "");
    let (module, part) = if let Some(m) = k.strip_suffix(".lora_A.weight") {
        (m.to_owned(), Part::Down)
    } else if let Some(m) = k.strip_suffix(".lora_B.weight") {
        (m.to_owned(), Part::Up)
    } else if let Some(m) = k.strip_suffix(".lora.down.weight") {
        (old(m), Part::Down)
    } else if let Some(m) = k.strip_suffix(".lora.up.weight") {
        (old(m), Part::Up)
    } else {
        return None;
    };
    Some((net, Name::Dotted(module), part))
}

/// The PEFT scale (`alpha / r` of `lora_adapter_metadata`, else 1) of a file.
fn read_meta(path: &Path) -> Result<((), f64)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut head = [0u8; 8];
    std::io::Read::read_exact(&mut &file, &mut head).map_err(|e| Error::io(path, e))?;
    let n = u64::from_le_bytes(head) as usize;
    if n > 100 << 20 {
        return Err(Error::IncompatibleModel(format!(
            "LoRA {}: not a safetensors file",
            path.display()
        )));
    }
    let mut buf = vec![0u8; n];
    std::io::Read::read_exact(&mut &file, &mut buf).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value = serde_json::from_slice(&buf)
        .map_err(|e| Error::IncompatibleModel(format!("LoRA {}: {e}", path.display())))?;
    let meta = &v["__metadata__"]["lora_adapter_metadata"];
    let scale = meta
        .as_str()
        .and_then(|m| serde_json::from_str::<serde_json::Value>(m).ok())
        .and_then(|m| {
            Some(m["unet.lora_alpha"].as_f64()? / m["unet.r"].as_f64().filter(|r| *r > 0.0)?)
        })
        .unwrap_or(1.0);
    Ok(((), scale))
}

/// The weight deltas of `loras` for the networks whose tensor names are given: by weight
/// tensor name, `Σ scale · s · up · down` in the weight's shape (f32, CPU).
pub fn plan(
    loras: &[LoraSpec],
    names: &HashMap<Net, Vec<String>>,
) -> Result<HashMap<Net, HashMap<String, Tensor>>> {
    let mut deltas: HashMap<Net, HashMap<String, Tensor>> = HashMap::new();
    for spec in loras {
        for (net, weight, f) in match_file(&spec.path, names, "")? {
            add_to(&mut deltas, net, weight, f.dense(spec.scale)?)?;
        }
    }
    Ok(deltas)
}

fn add_to(
    deltas: &mut HashMap<Net, HashMap<String, Tensor>>,
    net: Net,
    weight: String,
    d: Tensor,
) -> Result<()> {
    let slot = deltas.entry(net).or_default();
    let d = match slot.remove(&weight) {
        Some(prev) => (prev + d)?,
        None => d,
    };
    slot.insert(weight, d);
    Ok(())
}

/// Every adapter of a file matched to a weight of `names`: `(network, weight name, factor)`.
/// An adapter that matches nothing is an error (`hint` is added to its message).
fn match_file(
    path: &Path,
    names: &HashMap<Net, Vec<String>>,
    hint: &str,
) -> Result<Vec<(Net, String, Factor)>> {
    let index: HashMap<Net, HashMap<Name, &str>> = names
        .iter()
        .map(|(net, ns)| (*net, module_index(ns)))
        .collect();
    let (adapters, peft_scale) = read_any(path)?;
    let total = adapters.len();
    let mut unmatched = Vec::new();
    let mut out = Vec::new();
    for ((net, name), parts) in adapters {
        let Some(weight) = index.get(&net).and_then(|i| i.get(&name)) else {
            unmatched.push(name);
            continue;
        };
        let f = factor(path, &name, parts, peft_scale)?;
        out.push((net, (*weight).to_owned(), f));
    }
    if let Some(first) = unmatched.first() {
        let first = match first {
            Name::Dotted(m) | Name::Underscored(m) => m,
        };
        return Err(Error::IncompatibleModel(format!(
            "LoRA {}: {} of its {total} adapters match no layer of the model (e.g. `{first}`); {} matched{hint}",
            path.display(),
            unmatched.len(),
            total - unmatched.len()
        )));
    }
    Ok(out)
}

/// `NAME=FILE`: a LoRA file a request may name (the server's `--request-lora`).
#[derive(Debug, Clone, PartialEq)]
pub struct NamedLora {
    pub name: String,
    pub path: std::path::PathBuf,
}

impl std::str::FromStr for NamedLora {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.split_once('=') {
            Some((n, p)) if !n.trim().is_empty() && !p.is_empty() => Ok(Self {
                name: n.trim().to_owned(),
                path: p.into(),
            }),
            _ => Err(format!("`{s}`: expected NAME=FILE")),
        }
    }
}

/// LoRA files loaded once and kept low-rank, for requests to apply by name with a scale of
/// their own (the server's per-request LoRA). Each file is matched against the layers a
/// request may change when it is loaded, so a request never meets a file that does not fit.
#[derive(Debug, Clone, Default)]
pub struct LoraLibrary {
    files: std::collections::BTreeMap<String, Vec<(Net, String, Factor)>>,
}

impl LoraLibrary {
    /// `names`: the weights a request may change, by network.
    pub fn load(specs: &[NamedLora], names: &HashMap<Net, Vec<String>>) -> Result<Self> {
        let hint = "; a request may change the UNet's transformer blocks and the text encoder only (fold other adapters at load with --lora)";
        let mut files = std::collections::BTreeMap::new();
        for s in specs {
            if files.contains_key(&s.name) {
                return Err(Error::InvalidArgument {
                    field: "request-lora",
                    message: format!("the name `{}` is given twice", s.name),
                });
            }
            files.insert(s.name.clone(), match_file(&s.path, names, hint)?);
        }
        Ok(Self { files })
    }

    pub fn names(&self) -> Vec<String> {
        self.files.keys().cloned().collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.files.contains_key(name)
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The weight deltas of `set` (`(name, scale)`), as [`plan`] gives them for the same files
    /// and scales.
    pub fn deltas(&self, set: &[(String, f64)]) -> Result<HashMap<Net, HashMap<String, Tensor>>> {
        let mut deltas = HashMap::new();
        for (name, scale) in set {
            let Some(adapters) = self.files.get(name) else {
                return Err(Error::InvalidArgument {
                    field: "loras",
                    message: format!("no LoRA named `{name}` on this server"),
                });
            };
            for (net, weight, f) in adapters {
                add_to(&mut deltas, *net, weight.clone(), f.dense(*scale)?)?;
            }
        }
        Ok(deltas)
    }
}

/// Each weight tensor (`….weight`) by the names a LoRA may give its module: the dotted path and
/// the kohya underscore form, each with and without the text encoder's `text_model.` prefix.
fn module_index(names: &[String]) -> HashMap<Name, &str> {
    let mut idx = HashMap::new();
    for n in names {
        let Some(m) = n.strip_suffix(".weight") else {
            continue;
        };
        let mut forms = vec![m.to_owned()];
        match m.strip_prefix("text_model.") {
            Some(bare) => forms.push(bare.to_owned()),
            None => forms.push(format!("text_model.{m}")),
        }
        for f in forms {
            idx.insert(Name::Underscored(f.replace('.', "_")), n.as_str());
            idx.insert(Name::Dotted(f), n.as_str());
        }
    }
    idx
}

/// One adapter kept low-rank: `scale · s · up · down` in its weight's shape, `s` the file's
/// `alpha / rank` (kohya) or PEFT scale.
#[derive(Debug, Clone)]
struct Factor {
    /// `[out, rank]`.
    up: Tensor,
    /// `[rank, Π inner]`.
    down: Tensor,
    alpha: Option<f64>,
    peft_scale: f64,
    /// The weight's shape: `[out, in]` or `[out, in, kh, kw]`.
    shape: Vec<usize>,
}

impl Factor {
    fn dense(&self, scale: f64) -> Result<Tensor> {
        let scale = self.peft_scale * scale;
        let rank = self.down.dim(0)?;
        let s = self.alpha.map_or(scale, |a| scale * a / rank as f64);
        Ok((self.up.matmul(&self.down)?.reshape(self.shape.clone())? * s)?)
    }
}

/// Checks one adapter's halves and keeps them low-rank.
fn factor(path: &Path, name: &Name, p: Parts, peft_scale: f64) -> Result<Factor> {
    let label = match name {
        Name::Dotted(m) | Name::Underscored(m) => m.as_str(),
    };
    let bad =
        |m: String| Error::IncompatibleModel(format!("LoRA {}: {label}: {m}", path.display()));
    let (Some(down), Some(up)) = (p.down, p.up) else {
        return Err(bad("has only half of its adapter".into()));
    };
    let down = down.to_dtype(DType::F32)?;
    let up = up.to_dtype(DType::F32)?;
    let rank = down.dim(0)?;
    let out = up.dim(0)?;
    if up.elem_count() != out * rank {
        return Err(bad(format!(
            "up {:?} does not fit down {:?} (rank {rank})",
            up.dims(),
            down.dims()
        )));
    }
    let inner: Vec<usize> = down.dims()[1..].to_vec();
    let mut shape = vec![out];
    shape.extend(inner.iter().copied());
    Ok(Factor {
        up: up.reshape((out, rank))?,
        down: down.reshape((rank, inner.iter().product::<usize>()))?,
        alpha: p.alpha,
        peft_scale,
        shape,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn save(path: &Path, ts: &[(&str, Tensor)]) {
        let m: HashMap<String, Tensor> = ts
            .iter()
            .map(|(k, t)| ((*k).to_owned(), t.clone()))
            .collect();
        candle_core::safetensors::save(&m, path).expect("save");
    }

    fn names() -> HashMap<Net, Vec<String>> {
        HashMap::from([
            (
                Net::Unet,
                vec![
                    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight".to_owned(),
                    "down_blocks.0.resnets.0.conv1.weight".to_owned(),
                ],
            ),
            (
                Net::TextEncoder,
                vec!["text_model.encoder.layers.0.self_attn.q_proj.weight".to_owned()],
            ),
        ])
    }

    #[test]
    fn kohya_adapters_fold_with_alpha_over_rank_times_the_scale() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("k.safetensors");
        let dev = Device::Cpu;
        let down = Tensor::new(&[[1f32, 2.0], [0.0, 1.0]], &dev).expect("down"); // [r=2, in=2]
        let up = Tensor::new(&[[1f32, 0.0], [0.0, 3.0]], &dev).expect("up"); // [out=2, r=2]
        let conv_down = Tensor::ones((2, 3, 3, 3), DType::F32, &dev).expect("cd");
        let conv_up = Tensor::ones((4, 2, 1, 1), DType::F32, &dev).expect("cu");
        let k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
        let c = "lora_unet_down_blocks_0_resnets_0_conv1";
        let t = "lora_te_text_model_encoder_layers_0_self_attn_q_proj";
        save(
            &p,
            &[
                (&format!("{k}.lora_down.weight"), down.clone()),
                (&format!("{k}.lora_up.weight"), up.clone()),
                (&format!("{k}.alpha"), Tensor::new(1f32, &dev).expect("a")),
                (&format!("{c}.lora_down.weight"), conv_down),
                (&format!("{c}.lora_up.weight"), conv_up),
                (&format!("{t}.lora_down.weight"), down),
                (&format!("{t}.lora_up.weight"), up),
            ],
        );
        let spec = LoraSpec {
            path: p,
            scale: 0.5,
        };
        let d = plan(&[spec.clone(), spec], &names()).expect("plan");
        // Two files at 0.5 each, alpha 1 over rank 2: 0.5 · (up · down) in all.
        let q = &d[&Net::Unet]["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"];
        assert_eq!(q.to_vec2::<f32>().expect("v"), [[0.5, 1.0], [0.0, 1.5]]);
        // LoCon on a 3×3 convolution, no alpha (= rank): the delta has the kernel's shape.
        let conv = &d[&Net::Unet]["down_blocks.0.resnets.0.conv1.weight"];
        assert_eq!(conv.dims(), &[4, 3, 3, 3]);
        let v = conv
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("v");
        assert!(
            v.iter().all(|&x| (x - 2.0).abs() < 1e-6),
            "2 · 0.5 · 2 = 2: {v:?}"
        );
        let te = &d[&Net::TextEncoder]["text_model.encoder.layers.0.self_attn.q_proj.weight"];
        assert_eq!(te.to_vec2::<f32>().expect("v"), [[1.0, 2.0], [0.0, 3.0]]);
    }

    #[test]
    fn adapters_that_match_no_layer_are_counted_and_named() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("other.safetensors");
        let dev = Device::Cpu;
        let z = |s: (usize, usize)| Tensor::zeros(s, DType::F32, &dev).expect("z");
        let k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
        save(
            &p,
            &[
                (&format!("{k}.lora_down.weight"), z((2, 2))),
                (&format!("{k}.lora_up.weight"), z((2, 2))),
                (
                    "lora_unet_input_blocks_1_1_proj_in.lora_down.weight",
                    z((2, 2)),
                ),
                (
                    "lora_unet_input_blocks_1_1_proj_in.lora_up.weight",
                    z((2, 2)),
                ),
            ],
        );
        let err = plan(
            &[LoraSpec {
                path: p,
                scale: 1.0,
            }],
            &names(),
        )
        .expect_err("no match")
        .to_string();
        assert!(
            err.contains("1 of its 2 adapters match no layer")
                && err.contains("input_blocks_1_1_proj_in")
                && err.contains("1 matched"),
            "{err}"
        );
        let bad = dir.path().join("empty.safetensors");
        save(&bad, &[("something", z((1, 1)))]);
        let err = plan(
            &[LoraSpec {
                path: bad,
                scale: 1.0,
            }],
            &names(),
        )
        .expect_err("not a lora")
        .to_string();
        assert!(err.contains("no LoRA tensors"), "{err}");
    }

    #[test]
    fn specs_parse_a_scale_after_the_last_colon() {
        let s: LoraSpec = "a/b.safetensors:0.8".parse().expect("spec");
        assert_eq!((s.path.to_str(), s.scale), (Some("a/b.safetensors"), 0.8));
        let s: LoraSpec = "a/b.safetensors".parse().expect("spec");
        assert_eq!(s.scale, 1.0);
        let s: LoraSpec = r"C:\l.safetensors".parse().expect("spec");
        assert_eq!((s.path.to_str(), s.scale), (Some(r"C:\l.safetensors"), 1.0));
        assert!("x:NaN".parse::<LoraSpec>().is_err());
    }
}
