//! Training pairs from Parquet (`dataset-gen`'s output, or any dataset with the columns of
//! `timbrooks/instructpix2pix-clip-filtered`): images as `{bytes, path}` structs or plain
//! binary, the instruction as a string.
//!
//! Rows are read one at a time (a row group and a one-row selection), so a dataset larger than
//! memory trains as well as a small one. The order is a seeded permutation per epoch, and all
//! randomness of a sample (crop, flip) comes from its global position, so a resumed run sees the
//! same data in the same order.

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::{Array, RecordBatch};
use image::RgbImage;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReaderBuilder, RowSelection, RowSelector};
use rand_chacha::ChaCha20Rng;
use rand_core::RngCore;

use crate::pipeline::image::DecodeLimits;
use crate::{Error, Result};

/// Which columns hold what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Columns {
    pub original_image: String,
    pub edited_image: String,
    pub edit_prompt: String,
}

impl Default for Columns {
    fn default() -> Self {
        Self {
            original_image: "original_image".into(),
            edited_image: "edited_image".into(),
            edit_prompt: "edit_prompt".into(),
        }
    }
}

/// One training example, decoded.
#[derive(Debug, Clone)]
pub struct Pair {
    pub original: RgbImage,
    pub edited: RgbImage,
    pub instruction: String,
}

#[derive(Debug, Clone)]
struct FileIndex {
    path: PathBuf,
    /// Rows per row group.
    groups: Vec<usize>,
    rows: usize,
}

/// A Parquet dataset, indexed by row.
#[derive(Debug, Clone)]
pub struct PairDataset {
    files: Vec<FileIndex>,
    columns: Columns,
    len: usize,
}

fn parquet_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// `*.parquet` files of the given paths (folders are searched recursively), sorted.
pub fn parquet_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        if p.is_dir() {
            for e in std::fs::read_dir(p).map_err(|e| Error::io(p, e))? {
                let e = e.map_err(|e| Error::io(p, e))?;
                walk(&e.path(), out)?;
            }
        } else if p.extension().is_some_and(|e| e == "parquet") {
            out.push(p.to_path_buf());
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in paths {
        if !p.exists() {
            return Err(Error::io(
                p,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
            ));
        }
        walk(p, &mut out)?;
    }
    out.sort();
    Ok(out)
}

impl PairDataset {
    pub fn open(paths: &[PathBuf], columns: Columns) -> Result<Self> {
        let files = parquet_files(paths)?;
        if files.is_empty() {
            return Err(Error::invalid("data", "no .parquet files found"));
        }
        let mut index = Vec::new();
        let mut len = 0;
        for path in files {
            let f = File::open(&path).map_err(|e| Error::io(&path, e))?;
            let b =
                ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| parquet_err(&path, e))?;
            for c in [
                &columns.original_image,
                &columns.edited_image,
                &columns.edit_prompt,
            ] {
                if b.schema().field_with_name(c).is_err() {
                    return Err(parquet_err(&path, format!("no column `{c}`")));
                }
            }
            let groups: Vec<usize> = b
                .metadata()
                .row_groups()
                .iter()
                .map(|g| g.num_rows() as usize)
                .collect();
            let rows = groups.iter().sum();
            len += rows;
            index.push(FileIndex { path, groups, rows });
        }
        if len == 0 {
            return Err(Error::invalid("data", "the dataset has no rows"));
        }
        Ok(Self {
            files: index,
            columns,
            len,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Reads and decodes row `i`.
    pub fn get(&self, mut i: usize) -> Result<Pair> {
        let file = self
            .files
            .iter()
            .find(|f| {
                if i < f.rows {
                    true
                } else {
                    i -= f.rows;
                    false
                }
            })
            .ok_or_else(|| Error::invalid("row", "out of range"))?;
        let mut group = 0;
        for (g, &n) in file.groups.iter().enumerate() {
            if i < n {
                group = g;
                break;
            }
            i -= n;
        }
        let path = &file.path;
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        let n = file.groups[group];
        let selection = RowSelection::from(vec![
            RowSelector::skip(i),
            RowSelector::select(1),
            RowSelector::skip(n - i - 1),
        ]);
        let reader = ParquetRecordBatchReaderBuilder::try_new(f)
            .map_err(|e| parquet_err(path, e))?
            .with_row_groups(vec![group])
            .with_row_selection(selection)
            .with_batch_size(1)
            .build()
            .map_err(|e| parquet_err(path, e))?;
        for batch in reader {
            let batch = batch.map_err(|e| parquet_err(path, e))?;
            if batch.num_rows() == 1 {
                return self.decode_row(path, &batch);
            }
        }
        Err(parquet_err(path, "row not found"))
    }

    fn decode_row(&self, path: &Path, b: &RecordBatch) -> Result<Pair> {
        let limits = DecodeLimits::default();
        let image = |name: &str| -> Result<RgbImage> {
            let col = b
                .column_by_name(name)
                .ok_or_else(|| parquet_err(path, format!("no column {name}")))?;
            let bytes: Vec<u8> = if let Some(s) = col.as_struct_opt() {
                let c = s
                    .column_by_name("bytes")
                    .ok_or_else(|| parquet_err(path, format!("{name} has no `bytes`")))?;
                binary_value(c.as_ref())
                    .ok_or_else(|| parquet_err(path, format!("{name}.bytes is not binary")))?
            } else {
                binary_value(col.as_ref())
                    .ok_or_else(|| parquet_err(path, format!("{name} is not an image column")))?
            };
            Ok(crate::pipeline::image::decode(&bytes, &limits)?.rgb)
        };
        let col = b
            .column_by_name(&self.columns.edit_prompt)
            .ok_or_else(|| parquet_err(path, "no prompt column"))?;
        let instruction = if let Some(a) = col.as_string_opt::<i32>() {
            a.value(0).to_owned()
        } else if let Some(a) = col.as_string_opt::<i64>() {
            a.value(0).to_owned()
        } else if let Some(a) = col.as_string_view_opt() {
            a.value(0).to_owned()
        } else {
            return Err(parquet_err(path, "the prompt column is not a string"));
        };
        Ok(Pair {
            original: image(&self.columns.original_image)?,
            edited: image(&self.columns.edited_image)?,
            instruction,
        })
    }
}

fn binary_value(a: &dyn Array) -> Option<Vec<u8>> {
    if a.is_null(0) {
        return None;
    }
    if let Some(b) = a.as_binary_opt::<i32>() {
        return Some(b.value(0).to_vec());
    }
    if let Some(b) = a.as_binary_opt::<i64>() {
        return Some(b.value(0).to_vec());
    }
    a.as_binary_view_opt().map(|b| b.value(0).to_vec())
}

pub use crate::schedulers::noise::{rng_for, unit};

/// The data stream: epoch after epoch, a fresh seeded permutation of the rows each. The
/// current epoch's permutation is kept, so each row costs O(1) (a new epoch, O(rows)).
#[derive(Debug, Clone)]
pub struct EpochOrder {
    seed: u64,
    len: usize,
    epoch: Option<u64>,
    perm: Vec<usize>,
}

impl EpochOrder {
    pub fn new(seed: u64, len: usize) -> Self {
        Self {
            seed,
            len: len.max(1),
            epoch: None,
            perm: Vec::new(),
        }
    }

    /// The row at global position `g`.
    pub fn row(&mut self, g: u64) -> usize {
        let epoch = g / self.len as u64;
        if self.epoch != Some(epoch) {
            self.perm = (0..self.len).collect();
            let mut rng = rng_for(self.seed, b"epochprm", epoch);
            for i in (1..self.len).rev() {
                let j = (rng.next_u64() % (i as u64 + 1)) as usize;
                self.perm.swap(i, j);
            }
            self.epoch = Some(epoch);
        }
        self.perm[(g % self.len as u64) as usize]
    }
}

/// The same crop and flip for both images: the short side is resized to `res` (Pillow's
/// bicubic), then a `res × res` crop (random unless `center`) and a horizontal flip with
/// probability ½ when `flip`.
pub fn augment(
    pair: &Pair,
    res: u32,
    center: bool,
    flip: bool,
    rng: &mut ChaCha20Rng,
) -> (RgbImage, RgbImage) {
    let (w, h) = pair.original.dimensions();
    let (rw, rh) = if w <= h {
        (
            res,
            ((res as u64 * h as u64) / w.max(1) as u64).max(res as u64) as u32,
        )
    } else {
        (
            ((res as u64 * w as u64) / h.max(1) as u64).max(res as u64) as u32,
            res,
        )
    };
    let a = crate::pipeline::pil::resize_bicubic(&pair.original, rw, rh);
    let b = crate::pipeline::pil::resize_bicubic(&pair.edited, rw, rh);
    let (x, y) = if center {
        ((rw - res) / 2, (rh - res) / 2)
    } else {
        (
            (unit(rng) * f64::from(rw - res + 1)) as u32,
            (unit(rng) * f64::from(rh - res + 1)) as u32,
        )
    };
    let mut a = image::imageops::crop_imm(&a, x, y, res, res).to_image();
    let mut b = image::imageops::crop_imm(&b, x, y, res, res).to_image();
    if flip && unit(rng) < 0.5 {
        image::imageops::flip_horizontal_in_place(&mut a);
        image::imageops::flip_horizontal_in_place(&mut b);
    }
    (a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_epoch_is_a_permutation() {
        for len in [1, 2, 7] {
            let mut order = EpochOrder::new(5, len);
            for epoch in 0..3u64 {
                let mut seen: Vec<usize> = (0..len as u64)
                    .map(|p| order.row(epoch * len as u64 + p))
                    .collect();
                seen.sort();
                assert_eq!(seen, (0..len).collect::<Vec<_>>());
            }
        }
        let mut order = EpochOrder::new(5, 7);
        let e0: Vec<usize> = (0..7).map(|g| order.row(g)).collect();
        let e1: Vec<usize> = (7..14).map(|g| order.row(g)).collect();
        assert_ne!(e0, e1);
        // Jumping back (a resume) gives the same rows as walking there.
        let mut fresh = EpochOrder::new(5, 7);
        assert_eq!((0..7).map(|g| fresh.row(g)).collect::<Vec<_>>(), e0);
    }

    #[test]
    fn both_images_get_the_same_crop_and_flip() {
        let mk =
            |k: u8| RgbImage::from_fn(40, 30, |x, y| image::Rgb([x as u8 * 6, y as u8 * 8, k]));
        let pair = Pair {
            original: mk(0),
            edited: mk(200),
            instruction: String::new(),
        };
        for i in 0..20 {
            let mut rng = rng_for(1, b"augment_", i);
            let (a, b) = augment(&pair, 16, false, true, &mut rng);
            assert_eq!(a.dimensions(), (16, 16));
            for (pa, pb) in a.pixels().zip(b.pixels()) {
                assert_eq!(pa.0[..2], pb.0[..2]);
            }
        }
    }
}
