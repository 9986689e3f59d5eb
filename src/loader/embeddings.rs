//! Textual Inversion embeddings: a new word for the text encoder, one or several vectors.
//!
//! Reads the three formats people have — A1111 `.pt` (`string_to_param["*"]`, `name`), A1111
//! `.safetensors` (`emb_params`) and diffusers' `learned_embeds.safetensors` (`{token: vector}`)
//! — and binds them as diffusers' `load_textual_inversion` does: a multi-vector embedding
//! becomes the tokens `t`, `t_1`, … `t_{n-1}`, added to the tokenizer in order after its
//! vocabulary, and a prompt's `t` is expanded to all of them ([`crate::models::ClipTokenizer`]).
//! Pickles are read by a data-only interpreter (candle's), and refused when they name anything
//! but tensors, their storages and plain containers.

use std::path::{Path, PathBuf};

use candle_core::pickle::Object;
use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// `FILE[:TOKEN]` as the command line takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingSpec {
    pub path: PathBuf,
    /// The trigger word; `None`: the file's own (its `name`, its key, or the file name).
    pub token: Option<String>,
}

impl std::str::FromStr for EmbeddingSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        // A token never contains a path separator; a path may contain ':' (Windows drives).
        match s.rsplit_once(':') {
            Some((p, t)) if !t.is_empty() && !t.contains(['/', '\\']) && !p.is_empty() => {
                Ok(Self {
                    path: p.into(),
                    token: Some(t.to_owned()),
                })
            }
            _ if s.is_empty() => Err("an embedding file is needed".into()),
            _ => Ok(Self {
                path: s.into(),
                token: None,
            }),
        }
    }
}

/// An embedding read from a file: its trigger and vectors `[n, dim]` (f32, CPU).
#[derive(Debug, Clone)]
pub struct Embedding {
    pub token: String,
    pub vectors: Tensor,
    pub path: PathBuf,
}

impl Embedding {
    /// The tokens it occupies: `token`, `token_1`, … (diffusers' naming).
    pub fn tokens(&self) -> Result<Vec<String>> {
        let n = self.vectors.dim(0)?;
        Ok((0..n)
            .map(|i| match i {
                0 => self.token.clone(),
                i => format!("{}_{i}", self.token),
            })
            .collect())
    }
}

/// Reads an embedding in any of the three formats.
pub fn read(spec: &EmbeddingSpec) -> Result<Embedding> {
    let path = &spec.path;
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let (own, vectors) = match ext.as_str() {
        "safetensors" => read_safetensors(path)?,
        "pt" | "bin" | "ckpt" | "pth" => read_pickle(path)?,
        _ => {
            return Err(bad(
                path,
                "an embedding is a .pt, .bin or .safetensors file",
            ))
        }
    };
    let vectors = match vectors.rank() {
        1 => vectors.unsqueeze(0)?,
        2 => vectors,
        _ => {
            return Err(bad(
                path,
                format!(
                    "vectors of shape {:?}; [dim] or [n, dim] expected",
                    vectors.dims()
                ),
            ))
        }
    };
    let token = spec.token.clone().or(own).unwrap_or_else(|| {
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    if token.trim().is_empty() {
        return Err(bad(path, "no trigger word: give one as FILE:TOKEN"));
    }
    Ok(Embedding {
        token,
        vectors: vectors.to_dtype(DType::F32)?,
        path: path.clone(),
    })
}

fn bad(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::IncompatibleModel(format!("embedding {}: {msg}", path.display()))
}

/// A1111 (`emb_params`, trigger from the file name) or diffusers (`{token: vector}`).
fn read_safetensors(path: &Path) -> Result<(Option<String>, Tensor)> {
    let mut ts = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| bad(path, e))?;
    if let Some(t) = ts.remove("emb_params") {
        return Ok((None, t));
    }
    if ts.len() == 1 {
        let (k, t) = ts.into_iter().next().ok_or_else(|| bad(path, "empty"))?;
        return Ok((Some(k), t));
    }
    Err(bad(
        path,
        format!(
            "{} tensors and no `emb_params`: not an embedding (A1111 or diffusers)",
            ts.len()
        ),
    ))
}

/// A1111 `.pt` (`string_to_param["*"]`, trigger `name`) or a diffusers `.bin`
/// (`{token: vector}`), read without executing anything.
fn read_pickle(path: &Path) -> Result<(Option<String>, Tensor)> {
    let root = pickle_root(path)?;
    check_globals(path, &root)?;
    let Object::Dict(items) = root else {
        return Err(bad(path, "the pickle does not hold a dictionary"));
    };
    let key = |o: &Object| match o {
        Object::Unicode(s) => Some(s.clone()),
        _ => None,
    };
    let keys: Vec<String> = items.iter().filter_map(|(k, _)| key(k)).collect();
    let name = items.iter().find_map(|(k, v)| match (key(k)?.as_str(), v) {
        ("name", Object::Unicode(n)) => Some(n.clone()),
        _ => None,
    });
    let tensors = |dict_key: Option<&str>| {
        candle_core::pickle::PthTensors::new(path, dict_key).map_err(|e| bad(path, e))
    };
    if keys.iter().any(|k| k == "string_to_param") {
        let t = tensors(Some("string_to_param"))?
            .get("*")
            .map_err(|e| bad(path, e))?
            .ok_or_else(|| bad(path, "`string_to_param` has no `*`"))?;
        return Ok((name, t));
    }
    if let [k] = keys.as_slice() {
        let t = tensors(None)?
            .get(k)
            .map_err(|e| bad(path, e))?
            .ok_or_else(|| bad(path, format!("`{k}` is not a tensor")))?;
        return Ok((Some(k.clone()), t));
    }
    Err(bad(
        path,
        format!(
            "keys {keys:?}: neither A1111 (`string_to_param`) nor diffusers ({{token: vector}})"
        ),
    ))
}

/// The object a PyTorch zip file's `data.pkl` holds.
pub(crate) fn pickle_root(path: &Path) -> Result<Object> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| bad(path, format!("not a PyTorch zip file: {e}")))?;
    let name = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .find(|n| n.ends_with("data.pkl"))
        .ok_or_else(|| bad(path, "no data.pkl inside"))?;
    let entry = zip.by_name(&name).map_err(|e| bad(path, e))?;
    let mut stack = candle_core::pickle::Stack::empty();
    stack
        .read_loop(&mut std::io::BufReader::new(entry))
        .map_err(|e| bad(path, e))?;
    stack.finalize().map_err(|e| bad(path, e))
}

/// What a pickle of tensors and plain containers may name.
const ALLOWED: &[(&str, &str)] = &[
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "Tensor"),
    ("torch.nn.parameter", "Parameter"),
    ("collections", "OrderedDict"),
    ("torch", "FloatStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "DoubleStorage"),
    ("torch", "LongStorage"),
    ("torch", "IntStorage"),
    ("torch", "ByteStorage"),
    ("torch", "BoolStorage"),
];

/// Refuses a pickle that names any callable or class besides [`ALLOWED`] (anything else
/// would run code in Python's unpickler; here it is never run, but such a file is not an
/// embedding or checkpoint either).
pub(crate) fn check_globals(path: &Path, o: &Object) -> Result<()> {
    let mut stack = vec![o];
    while let Some(o) = stack.pop() {
        match o {
            Object::Class {
                module_name,
                class_name,
            } if !ALLOWED
                .iter()
                .any(|(m, c)| m == module_name && c == class_name) =>
            {
                return Err(bad(
                    path,
                    format!(
                        "the pickle references `{module_name}.{class_name}`; only tensors and plain containers are read (refused, nothing was run)"
                    ),
                ));
            }
            Object::Reduce { callable, args } | Object::Build { callable, args } => {
                stack.push(callable);
                stack.push(args);
            }
            Object::Tuple(v) | Object::List(v) => stack.extend(v.iter()),
            Object::Dict(kv) => {
                for (k, v) in kv {
                    stack.push(k);
                    stack.push(v);
                }
            }
            Object::PersistentLoad(x) => stack.push(x),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PyTorch zip file whose `data.pkl` is `pickle`.
    fn torch_zip(path: &Path, pickle: &[u8]) {
        use std::io::Write;
        let f = std::fs::File::create(path).expect("create");
        let mut z = zip::ZipWriter::new(f);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        z.start_file("emb/data.pkl", opts).expect("entry");
        z.write_all(pickle).expect("write");
        z.finish().expect("finish");
    }

    #[test]
    fn a_pickle_naming_anything_but_tensors_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("evil.pt");
        // {"name": os.system} — Python's unpickler would import os; ours refuses the file.
        let mut pk = b"\x80\x02}X\x04\x00\x00\x00name".to_vec();
        pk.extend(b"cos\nsystem\ns.");
        torch_zip(&p, &pk);
        let err = read(&EmbeddingSpec {
            path: p.clone(),
            token: None,
        })
        .expect_err("refused")
        .to_string();
        assert!(
            err.contains("os.system") && err.contains("refused"),
            "{err}"
        );
        // A plain dictionary without tensors is read, and found not to be an embedding.
        let p = dir.path().join("plain.pt");
        torch_zip(&p, b"\x80\x02}X\x04\x00\x00\x00nameX\x01\x00\x00\x00xs.");
        let err = read(&EmbeddingSpec {
            path: p,
            token: None,
        })
        .expect_err("not an embedding")
        .to_string();
        assert!(err.contains("`name` is not a tensor"), "{err}");
    }

    #[test]
    fn the_three_formats_read_with_their_own_or_a_given_token() {
        let fx =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/personal");
        if !fx.is_dir() {
            return;
        }
        let e = read(&EmbeddingSpec {
            path: fx.join("cat-toy.pt"),
            token: None,
        })
        .expect("a1111 pt");
        assert_eq!(e.token, "cat-toy", "the file's `name`");
        assert_eq!(e.vectors.dims(), &[2, 32]);
        assert_eq!(e.tokens().expect("tokens"), ["cat-toy", "cat-toy_1"]);
        let e = read(&EmbeddingSpec {
            path: fx.join("watercolor-style.safetensors"),
            token: Some("<wc>".into()),
        })
        .expect("diffusers");
        assert_eq!(
            (e.token.as_str(), e.vectors.dims()),
            ("<wc>", &[1usize, 32][..])
        );
        // A1111 safetensors: `emb_params`, the trigger from the file name.
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("my-style.safetensors");
        let t = Tensor::ones((3, 32), DType::F32, &Device::Cpu).expect("t");
        candle_core::safetensors::save(
            &std::collections::HashMap::from([("emb_params".to_owned(), t)]),
            &p,
        )
        .expect("save");
        let e = read(&EmbeddingSpec {
            path: p,
            token: None,
        })
        .expect("a1111 st");
        assert_eq!(
            (e.token.as_str(), e.vectors.dims()),
            ("my-style", &[3usize, 32][..])
        );
    }

    #[test]
    fn specs_parse_with_and_without_a_token() {
        let s: EmbeddingSpec = "a/b.pt:<cat>".parse().expect("spec");
        assert_eq!(s.path, PathBuf::from("a/b.pt"));
        assert_eq!(s.token.as_deref(), Some("<cat>"));
        let s: EmbeddingSpec = "a/b.pt".parse().expect("spec");
        assert_eq!(s.token, None);
        let s: EmbeddingSpec = r"C:\x\b.pt".parse().expect("spec");
        assert_eq!(s.token, None, "a drive letter is not a token");
        assert!("".parse::<EmbeddingSpec>().is_err());
    }
}
