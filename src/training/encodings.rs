//! Frozen encodings computed once (`ip2p train --cache-encodings`): every row's VAE latents of
//! both pictures, whole and at their own size, and every distinct instruction's text encoding.
//! A step then runs the UNet alone. The dataset's pictures must all have one size, each side a
//! multiple of the VAE's factor; the whole latents are trained on (no crop), and a flip mirrors
//! them.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::data::{parquet_files, Columns, PairDataset};
use crate::models::AutoencoderKL;
use crate::pipeline::image::to_tensor;
use crate::{Error, Result};

/// Rows encoded together.
const CHUNK: usize = 8;

/// One row's encodings, each `[1, latent, h, w]`.
struct EncodedRow {
    /// The input picture's latent mode, unscaled (the UNet's image condition).
    image: Tensor,
    /// The edited picture's latent mean and standard deviation (the target is a sample).
    mean: Tensor,
    std: Tensor,
    prompt: String,
}

/// A micro-batch taken from the cache.
pub struct CachedBatch {
    pub image: Tensor,
    pub mean: Tensor,
    pub std: Tensor,
    pub prompts: Vec<String>,
}

/// Every row's encodings and every instruction's.
pub struct EncodingCache {
    rows: Vec<EncodedRow>,
    text: HashMap<String, Tensor>,
    /// `(h, w)` of the latents.
    latent_hw: (usize, usize),
}

impl EncodingCache {
    /// Encodes all of `data` with `vae` and `encode_text` (prompts → `[n, tokens, dim]`).
    pub fn build(
        data: &PairDataset,
        vae: &AutoencoderKL,
        encode_text: &dyn Fn(&[&str]) -> Result<Tensor>,
        dev: &Device,
    ) -> Result<Self> {
        let t0 = Instant::now();
        let f = vae.scale_factor() as u32;
        let mut rows = Vec::with_capacity(data.len());
        let mut size = None;
        for start in (0..data.len()).step_by(CHUNK) {
            let end = (start + CHUNK).min(data.len());
            let pairs = (start..end)
                .into_par_iter()
                .map(|r| data.get(r))
                .collect::<Result<Vec<_>>>()?;
            let mut pics = Vec::with_capacity(2 * pairs.len());
            for (k, p) in pairs.iter().enumerate() {
                let dims = p.original.dimensions();
                let want = *size.get_or_insert(dims);
                if dims != want
                    || p.edited.dimensions() != want
                    || dims.0 % f != 0
                    || dims.1 % f != 0
                {
                    return Err(Error::invalid(
                        "cache_encodings",
                        format!(
                            "row {}: pictures {}×{} and {}×{}; caching needs one size for all, each side a multiple of {f}",
                            start + k,
                            dims.0,
                            dims.1,
                            p.edited.dimensions().0,
                            p.edited.dimensions().1
                        ),
                    ));
                }
                pics.push(to_tensor(&p.original, dev)?);
            }
            for p in &pairs {
                pics.push(to_tensor(&p.edited, dev)?);
            }
            let n = pairs.len();
            let dist = vae.encode(&Tensor::cat(&pics, 0)?)?;
            let std = (&dist.logvar * 0.5)?.exp()?;
            for (k, p) in pairs.into_iter().enumerate() {
                rows.push(EncodedRow {
                    image: dist.mean.narrow(0, k, 1)?,
                    mean: dist.mean.narrow(0, n + k, 1)?,
                    std: std.narrow(0, n + k, 1)?,
                    prompt: p.instruction,
                });
            }
            if (start / CHUNK) % 64 == 63 {
                tracing::info!(rows = end, of = data.len(), "encoding the pictures");
            }
        }
        let text = encode_prompts(&rows, encode_text)?;
        let (_, _, h, w) = rows
            .first()
            .map(|r| r.image.dims4())
            .transpose()?
            .ok_or_else(|| Error::invalid("data", "no rows"))?;
        tracing::info!(
            rows = rows.len(),
            prompts = text.len(),
            seconds = t0.elapsed().as_secs_f64(),
            "encodings cached"
        );
        Ok(Self {
            rows,
            text,
            latent_hw: (h, w),
        })
    }

    /// The cache kept at `store` when its key matches, else [`EncodingCache::build`], then
    /// kept there (a failure to write is logged, not fatal: the run goes on in memory).
    pub fn load_or_build(
        store: &CacheStore,
        data: &PairDataset,
        vae: &AutoencoderKL,
        encode_text: &dyn Fn(&[&str]) -> Result<Tensor>,
        dev: &Device,
    ) -> Result<Self> {
        match store.load(dev) {
            Ok(Some(c)) if c.rows.len() == data.len() => {
                let path = store.tensors();
                tracing::info!(path = %path.display(), rows = c.rows.len(), "encodings read from disk");
                return Ok(c);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "the kept encodings are unreadable; encoding again")
            }
        }
        let c = Self::build(data, vae, encode_text, dev)?;
        if let Err(e) = store.save(&c) {
            tracing::warn!(error = %e, "the encodings were not kept on disk");
        }
        Ok(c)
    }

    /// `(h, w)` of every row's latents.
    pub fn latent_hw(&self) -> (usize, usize) {
        self.latent_hw
    }

    /// Rows `rows`, each mirrored left–right where `flips` says.
    pub fn batch(&self, rows: &[usize], flips: &[bool]) -> Result<CachedBatch> {
        let pick = |f: fn(&EncodedRow) -> &Tensor| -> Result<Tensor> {
            let parts = rows
                .iter()
                .zip(flips)
                .map(|(&r, &flip)| {
                    let t = f(&self.rows[r]);
                    if flip {
                        t.flip(&[3])
                    } else {
                        Ok(t.clone())
                    }
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(Tensor::cat(&parts, 0)?)
        };
        Ok(CachedBatch {
            image: pick(|r| &r.image)?,
            mean: pick(|r| &r.mean)?,
            std: pick(|r| &r.std)?,
            prompts: rows.iter().map(|&r| self.rows[r].prompt.clone()).collect(),
        })
    }

    /// The cached encoding of `prompt` (`[1, tokens, dim]`).
    pub fn text(&self, prompt: &str) -> Option<&Tensor> {
        self.text.get(prompt)
    }
}

/// Each distinct prompt of `rows`, and the empty one, encoded once.
fn encode_prompts(
    rows: &[EncodedRow],
    encode_text: &dyn Fn(&[&str]) -> Result<Tensor>,
) -> Result<HashMap<String, Tensor>> {
    let mut distinct: Vec<&str> = rows.iter().map(|r| r.prompt.as_str()).collect();
    distinct.push("");
    distinct.sort_unstable();
    distinct.dedup();
    let mut text = HashMap::with_capacity(distinct.len());
    for chunk in distinct.chunks(32) {
        let enc = encode_text(chunk)?;
        for (k, p) in chunk.iter().enumerate() {
            text.insert((*p).to_owned(), enc.narrow(0, k, 1)?);
        }
    }
    Ok(text)
}

/// Bumped whenever what [`EncodingCache::build`] computes changes.
const FORMAT: &str = "ip2p-encodings-1";

/// The list of prompts beside the cached tensors.
#[derive(Serialize, Deserialize)]
struct Index {
    format: String,
    /// Each row's prompt, as an index into `prompts`.
    rows: Vec<usize>,
    /// Row `i` of the `text` tensor encodes `prompts[i]`.
    prompts: Vec<String>,
}

/// Where encodings are kept on disk: `<dir>/<key>.safetensors` and `<key>.json`, the key a
/// SHA-256 of everything they are computed from — the data files' bytes, the column names and
/// the model's VAE, text encoder and tokenizer files — so a changed input never reuses them.
#[derive(Debug, Clone)]
pub struct CacheStore {
    dir: PathBuf,
    key: String,
}

impl CacheStore {
    /// The store in `dir` for `data` (paths as `ip2p train` takes them) encoded by the model
    /// folder `model`.
    /// The same store keyed also by `extra` (labels and files, e.g. embeddings and their
    /// trigger words): encodings made without them are never reused with them.
    pub fn salted(self, extra: &[(String, PathBuf)]) -> Result<Self> {
        if extra.is_empty() {
            return Ok(self);
        }
        let mut h = Sha256::new();
        h.update(self.key.as_bytes());
        for (label, f) in extra {
            h.update((label.len() as u64).to_le_bytes());
            h.update(label.as_bytes());
            hash_file(&mut h, f)?;
        }
        let key = format!("{:x}", h.finalize());
        Ok(Self {
            dir: self.dir,
            key: key[..self.key.len()].to_owned(),
        })
    }

    pub fn new(dir: &Path, data: &[PathBuf], columns: &Columns, model: &Path) -> Result<Self> {
        let mut h = Sha256::new();
        h.update(FORMAT);
        for c in [
            &columns.original_image,
            &columns.edited_image,
            &columns.edit_prompt,
        ] {
            h.update((c.len() as u64).to_le_bytes());
            h.update(c);
        }
        for f in parquet_files(data)? {
            hash_file(&mut h, &f)?;
        }
        for part in ["vae", "text_encoder", "tokenizer"] {
            let mut files = Vec::new();
            walk(&model.join(part), &mut files)?;
            files.sort();
            for f in files {
                h.update(
                    f.strip_prefix(model)
                        .unwrap_or(&f)
                        .to_string_lossy()
                        .as_bytes(),
                );
                hash_file(&mut h, &f)?;
            }
        }
        let key = h
            .finalize()
            .iter()
            .take(12)
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Self {
            dir: dir.to_path_buf(),
            key,
        })
    }

    fn tensors(&self) -> PathBuf {
        self.dir.join(format!("{}.safetensors", self.key))
    }

    fn index(&self) -> PathBuf {
        self.dir.join(format!("{}.json", self.key))
    }

    /// The cache, when both files are there and readable.
    fn load(&self, dev: &Device) -> Result<Option<EncodingCache>> {
        let (t, i) = (self.tensors(), self.index());
        if !t.is_file() || !i.is_file() {
            return Ok(None);
        }
        let index: Index = crate::loader::read_json(&i)?;
        if index.format != FORMAT {
            return Ok(None);
        }
        let mut ts = candle_core::safetensors::load(&t, dev)?;
        let mut take = |name: &str| {
            ts.remove(name).ok_or_else(|| {
                Error::invalid("encodings", format!("{} has no `{name}`", t.display()))
            })
        };
        let (image, mean, std, text) = (take("image")?, take("mean")?, take("std")?, take("text")?);
        let rows = index
            .rows
            .iter()
            .enumerate()
            .map(|(r, &p)| {
                Ok(EncodedRow {
                    image: image.narrow(0, r, 1)?,
                    mean: mean.narrow(0, r, 1)?,
                    std: std.narrow(0, r, 1)?,
                    prompt: index.prompts.get(p).cloned().unwrap_or_default(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let text = index
            .prompts
            .iter()
            .enumerate()
            .map(|(k, p)| Ok((p.clone(), text.narrow(0, k, 1)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        let (_, _, h, w) = image.dims4()?;
        Ok(Some(EncodingCache {
            rows,
            text,
            latent_hw: (h, w),
        }))
    }

    /// Writes `c` (tensors first, the index last, each through a temporary name: a partial
    /// write is never read as a cache).
    fn save(&self, c: &EncodingCache) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let prompts: Vec<String> = c.text.keys().cloned().collect();
        let at: HashMap<&str, usize> = prompts
            .iter()
            .enumerate()
            .map(|(k, p)| (p.as_str(), k))
            .collect();
        let rows = c
            .rows
            .iter()
            .map(|r| at.get(r.prompt.as_str()).copied().unwrap_or(0))
            .collect();
        let cat = |f: fn(&EncodedRow) -> &Tensor| {
            Tensor::cat(&c.rows.iter().map(f).collect::<Vec<_>>(), 0)
        };
        let text = Tensor::cat(
            &prompts
                .iter()
                .map(|p| c.text[p].clone())
                .collect::<Vec<_>>(),
            0,
        )?;
        let tensors = HashMap::from([
            ("image".to_owned(), cat(|r| &r.image)?),
            ("mean".to_owned(), cat(|r| &r.mean)?),
            ("std".to_owned(), cat(|r| &r.std)?),
            ("text".to_owned(), text),
        ]);
        let tmp = self.dir.join(format!("{}.safetensors.tmp", self.key));
        candle_core::safetensors::save(&tensors, &tmp)?;
        std::fs::rename(&tmp, self.tensors()).map_err(|e| Error::io(&tmp, e))?;
        let index = Index {
            format: FORMAT.to_owned(),
            rows,
            prompts,
        };
        let json =
            serde_json::to_vec(&index).map_err(|e| Error::invalid("encodings", e.to_string()))?;
        let tmp = self.dir.join(format!("{}.json.tmp", self.key));
        std::fs::write(&tmp, json).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, self.index()).map_err(|e| Error::io(&tmp, e))?;
        tracing::info!(path = %self.tensors().display(), "encodings kept on disk");
        Ok(())
    }
}

/// Every file under `p` (none if `p` does not exist).
fn walk(p: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if p.is_dir() {
        for e in std::fs::read_dir(p).map_err(|e| Error::io(p, e))? {
            walk(&e.map_err(|e| Error::io(p, e))?.path(), out)?;
        }
    } else if p.is_file() {
        out.push(p.to_path_buf());
    }
    Ok(())
}

/// Feeds `f`'s length and bytes to `h`.
fn hash_file(h: &mut Sha256, f: &Path) -> Result<()> {
    let mut file = std::fs::File::open(f).map_err(|e| Error::io(f, e))?;
    let len = file.metadata().map_err(|e| Error::io(f, e))?.len();
    h.update(len.to_le_bytes());
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(f, e))?;
        if n == 0 {
            return Ok(());
        }
        h.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key follows every input: the data's bytes, a column name, the VAE and the text
    /// encoder; files elsewhere in the model (the UNet being trained) do not count.
    #[test]
    fn the_cache_key_changes_with_any_input() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path();
        let write = |rel: &str, bytes: &[u8]| {
            let p = d.join(rel);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, bytes).expect("write");
        };
        write("data/a.parquet", b"rows");
        write("model/vae/w.safetensors", b"vae");
        write("model/text_encoder/w.safetensors", b"te");
        write("model/unet/w.safetensors", b"unet");
        let key = |cols: &Columns| {
            CacheStore::new(d, &[d.join("data")], cols, &d.join("model"))
                .expect("store")
                .key
        };
        let cols = Columns::default();
        let k0 = key(&cols);
        assert_eq!(k0, key(&cols), "the key is deterministic");
        write("model/unet/w.safetensors", b"unet trained");
        assert_eq!(k0, key(&cols), "the UNet is not an input");
        let other = Columns {
            edit_prompt: "instruction".into(),
            ..cols.clone()
        };
        assert_ne!(k0, key(&other));
        let mut seen = vec![k0];
        for (rel, bytes) in [
            ("data/a.parquet", &b"rowz"[..]),
            ("model/vae/w.safetensors", b"vae2"),
            ("model/text_encoder/w.safetensors", b"te2"),
            ("model/tokenizer/vocab.json", b"{}"),
        ] {
            write(rel, bytes);
            let k = key(&cols);
            assert!(!seen.contains(&k), "{rel} changed the key");
            seen.push(k);
        }
    }
}
