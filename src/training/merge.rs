//! Checkpoint merges (`ip2p merge`), the A1111 checkpoint merger's two modes on diffusers
//! folders (or anything `--model` takes: hub ids, single files):
//!
//! * weighted sum: `A·(1 − α) + B·α`;
//! * add difference: `A + α·(B − C)` — the InstructPix2Pix recipe "ip2p + (DreamBooth
//!   fine-tune − SD 1.5)" carries a fine-tune's subject into the editing model.
//!
//! Every float tensor of the UNet, the text encoder and the VAE is merged by name. When A's
//! UNet takes 8 input channels and B's (and C's) 4, `conv_in` merges its first 4 input channels
//! and keeps A's other 4, as A1111 does for instruct-pix2pix. Everything else (configs,
//! tokenizer, scheduler) is A's. A tensor B or C lacks is kept from A and counted; a shape that
//! differs otherwise is an error naming the tensor.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::loader::{ModelDir, Variant};
use crate::{Error, Result};

/// How two or three models combine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MergeMode {
    /// `A·(1 − α) + B·α`.
    WeightedSum,
    /// `A + α·(B − C)`.
    AddDifference,
}

/// What `merge` writes and how.
#[derive(Debug, Clone, Copy)]
pub struct MergeOptions {
    pub mode: MergeMode,
    pub alpha: f64,
    /// Write fp16 weights (else f32).
    pub half: bool,
}

/// What a merge did, for the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MergeReport {
    pub merged: usize,
    /// Tensors B or C lacks (kept from A).
    pub kept_from_a: usize,
    /// `conv_in` merged on its first 4 of 8 input channels.
    pub partial_conv_in: bool,
}

const PARTS: [(&str, &str); 3] = [
    ("unet", "diffusion_pytorch_model"),
    ("text_encoder", "model"),
    ("vae", "diffusion_pytorch_model"),
];

/// Merges `a` with `b` (and `c` for add-difference) into a diffusers folder at `out`.
pub fn merge(
    a: &ModelDir,
    b: &ModelDir,
    c: Option<&ModelDir>,
    opts: MergeOptions,
    out: &Path,
) -> Result<MergeReport> {
    if !opts.alpha.is_finite() {
        return Err(Error::invalid("alpha", "must be a finite number"));
    }
    if (opts.mode == MergeMode::AddDifference) != c.is_some() {
        return Err(Error::invalid(
            "c",
            "add-difference takes a third model (C); a weighted sum takes none",
        ));
    }
    let mut report = MergeReport::default();
    crate::fsutil::commit_dir(out, |tmp| {
        super::copy_tree(a.root(), tmp, false, &["unet", "text_encoder", "vae"])?;
        for (part, stem) in PARTS {
            for sub in std::fs::read_dir(a.root().join(part)).map_err(|e| Error::io(a.root(), e))? {
                let p = sub.map_err(|e| Error::io(a.root(), e))?.path();
                if p.extension().is_some_and(|e| e == "json") {
                    let to = tmp.join(part);
                    std::fs::create_dir_all(&to).map_err(|e| Error::io(&to, e))?;
                    let name = p.file_name().unwrap_or_default();
                    std::fs::copy(&p, to.join(name)).map_err(|e| Error::io(&p, e))?;
                }
            }
            let load = |d: &ModelDir| read_part(d, part, stem);
            let (ta, tb) = (load(a)?, load(b)?);
            let tc = c.map(load).transpose()?;
            let merged = merge_part(part, &ta, &tb, tc.as_ref(), opts, &mut report)?;
            let file = tmp.join(part).join(format!("{stem}.safetensors"));
            candle_core::safetensors::save(&merged, &file)?;
        }
        Ok(())
    })?;
    Ok(report)
}

/// Every tensor of one network of a folder (f32 on the CPU; non-float tensors as stored).
fn read_part(d: &ModelDir, part: &str, stem: &str) -> Result<HashMap<String, Tensor>> {
    let mut all = HashMap::new();
    for f in d.weights(part, stem, Variant::Auto)? {
        for (k, t) in candle_core::safetensors::load(&f, &Device::Cpu)? {
            let t = if t.dtype().is_float() {
                t.to_dtype(DType::F32)?
            } else {
                t
            };
            all.insert(k, t);
        }
    }
    Ok(all)
}

fn merge_part(
    part: &str,
    a: &HashMap<String, Tensor>,
    b: &HashMap<String, Tensor>,
    c: Option<&HashMap<String, Tensor>>,
    o: MergeOptions,
    report: &mut MergeReport,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::with_capacity(a.len());
    for (k, ta) in a {
        let (Some(tb), true) = (b.get(k), ta.dtype().is_float()) else {
            report.kept_from_a += usize::from(ta.dtype().is_float());
            out.insert(k.clone(), ta.clone());
            continue;
        };
        let tc = match c.map(|c| c.get(k)) {
            Some(None) => {
                report.kept_from_a += 1;
                out.insert(k.clone(), ta.clone());
                continue;
            }
            Some(Some(t)) => Some(t),
            None => None,
        };
        let merged = if ta.dims() == tb.dims() && tc.is_none_or(|t| t.dims() == ta.dims()) {
            combine(ta, tb, tc, o)?
        } else if part == "unet" && k == "conv_in.weight" && ta.dim(1)? == 8 && tb.dim(1)? == 4 {
            // instruct-pix2pix × a 4-channel model: the noisy-latent channels merge, the
            // image-condition channels stay A's.
            report.partial_conv_in = true;
            let first = combine(&ta.narrow(1, 0, 4)?, tb, tc, o)?;
            Tensor::cat(&[first, ta.narrow(1, 4, 4)?], 1)?
        } else {
            return Err(Error::IncompatibleModel(format!(
                "merge: {part}/{k} has shape {:?} in A and {:?} in B{}",
                ta.dims(),
                tb.dims(),
                tc.map(|t| format!(" and {:?} in C", t.dims()))
                    .unwrap_or_default()
            )));
        };
        report.merged += 1;
        let merged = if o.half {
            merged.to_dtype(DType::F16)?
        } else {
            merged
        };
        out.insert(k.clone(), merged);
    }
    Ok(out)
}

fn combine(a: &Tensor, b: &Tensor, c: Option<&Tensor>, o: MergeOptions) -> Result<Tensor> {
    Ok(match (o.mode, c) {
        (MergeMode::WeightedSum, _) => ((a * (1.0 - o.alpha))? + (b * o.alpha)?)?,
        (MergeMode::AddDifference, Some(c)) => (a + ((b - c)? * o.alpha)?)?,
        (MergeMode::AddDifference, None) => {
            return Err(Error::invalid("c", "add-difference needs C"));
        }
    })
}
