//! Frozen encodings computed once (`ip2p train --cache-encodings`): every row's VAE latents of
//! both pictures, whole and at their own size, and every distinct instruction's text encoding.
//! A step then runs the UNet alone. The dataset's pictures must all have one size, each side a
//! multiple of the VAE's factor; the whole latents are trained on (no crop), and a flip mirrors
//! them.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::data::PairDataset;
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
