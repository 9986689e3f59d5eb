//! Parquet shards in the layout of `timbrooks/instructpix2pix-clip-filtered`.
//!
//! Columns `original_prompt`, `original_image`, `edit_prompt`, `edited_prompt`, `edited_image`
//! (images as `{bytes, path}` structs holding PNGs, with the Hugging Face `features` metadata
//! so `datasets` decodes them as images), plus `seed`, `guidance_scale`, `p2p_threshold` and the
//! four CLIP similarities under the names of the paper's generation metadata.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::{BinaryBuilder, StringBuilder};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type, Int64Type};
use arrow_array::{
    ArrayRef, Float32Array, Float64Array, Int64Array, RecordBatch, StringArray, StructArray,
};
use arrow_schema::{DataType, Field, Fields, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use crate::error::{Error, Result};
use crate::fsutil::commit_file;
use crate::render::Row;

fn image_fields() -> Fields {
    Fields::from(vec![
        Field::new("bytes", DataType::Binary, true),
        Field::new("path", DataType::Utf8, true),
    ])
}

/// The Hugging Face `datasets` features of our columns.
fn hf_features() -> String {
    let v = |dtype: &str| serde_json::json!({"dtype": dtype, "_type": "Value"});
    let img = serde_json::json!({"_type": "Image"});
    serde_json::json!({"info": {"features": {
        "original_prompt": v("string"),
        "original_image": img,
        "edit_prompt": v("string"),
        "edited_prompt": v("string"),
        "edited_image": img,
        "seed": v("int64"),
        "guidance_scale": v("float64"),
        "p2p_threshold": v("float64"),
        "clip_sim_0": v("float32"),
        "clip_sim_1": v("float32"),
        "clip_sim_dir": v("float32"),
        "clip_sim_image": v("float32"),
    }}})
    .to_string()
}

/// The Arrow schema of a shard.
pub fn schema() -> Arc<Schema> {
    let img = DataType::Struct(image_fields());
    // Nullable like the fields `datasets` derives from its features: it applies the features
    // metadata only where the Arrow fields match exactly.
    let fields = vec![
        Field::new("original_prompt", DataType::Utf8, true),
        Field::new("original_image", img.clone(), true),
        Field::new("edit_prompt", DataType::Utf8, true),
        Field::new("edited_prompt", DataType::Utf8, true),
        Field::new("edited_image", img, true),
        Field::new("seed", DataType::Int64, true),
        Field::new("guidance_scale", DataType::Float64, true),
        Field::new("p2p_threshold", DataType::Float64, true),
        Field::new("clip_sim_0", DataType::Float32, true),
        Field::new("clip_sim_1", DataType::Float32, true),
        Field::new("clip_sim_dir", DataType::Float32, true),
        Field::new("clip_sim_image", DataType::Float32, true),
    ];
    let meta = HashMap::from([("huggingface".to_owned(), hf_features())]);
    Arc::new(Schema::new_with_metadata(fields, meta))
}

fn image_column(rows: &[Row], which: usize) -> Result<ArrayRef> {
    let mut bytes = BinaryBuilder::new();
    let mut paths = StringBuilder::new();
    for r in rows {
        bytes.append_value(if which == 0 {
            &r.original_png
        } else {
            &r.edited_png
        });
        paths.append_value(format!("{:08}_{:03}_{which}.png", r.item, r.sample));
    }
    let s = StructArray::try_new(
        image_fields(),
        vec![Arc::new(bytes.finish()), Arc::new(paths.finish())],
        None,
    )?;
    Ok(Arc::new(s))
}

/// One record batch of rows.
pub fn batch(rows: &[Row]) -> Result<RecordBatch> {
    let strings = |f: fn(&Row) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(rows.iter().map(f)))
    };
    let f32s = |f: fn(&Row) -> f32| -> ArrayRef {
        Arc::new(Float32Array::from_iter_values(rows.iter().map(f)))
    };
    let cols: Vec<ArrayRef> = vec![
        strings(|r| &r.triple.input),
        image_column(rows, 0)?,
        strings(|r| &r.triple.edit),
        strings(|r| &r.triple.output),
        image_column(rows, 1)?,
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|r| i64::from(r.spec.seed)),
        )),
        Arc::new(Float64Array::from_iter_values(
            rows.iter().map(|r| r.spec.guidance_scale),
        )),
        Arc::new(Float64Array::from_iter_values(
            rows.iter().map(|r| r.spec.p2p_threshold),
        )),
        f32s(|r| r.sims.image0_caption0),
        f32s(|r| r.sims.image1_caption1),
        f32s(|r| r.sims.direction),
        f32s(|r| r.sims.image0_image1),
    ];
    Ok(RecordBatch::try_new(schema(), cols)?)
}

/// Writes `rows` to `path` atomically (temporary file, fsync, rename, fsync of the folder).
pub fn write_part(path: &Path, rows: &[Row]) -> Result<()> {
    let batch = batch(rows)?;
    commit_file(path, |file| {
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(64))
            .build();
        let mut w = ArrowWriter::try_new(file, batch.schema(), Some(props))?;
        w.write(&batch)?;
        w.close()?;
        Ok(())
    })
}

/// An image column read back: PNG bytes and paths.
type ImageColumn = (Vec<Vec<u8>>, Vec<Option<String>>);

/// A row read back from a shard.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRow {
    pub original_prompt: String,
    pub original_image: Vec<u8>,
    pub original_path: Option<String>,
    pub edit_prompt: String,
    pub edited_prompt: String,
    pub edited_image: Vec<u8>,
    pub seed: i64,
    pub guidance_scale: f64,
    pub p2p_threshold: f64,
    pub clip_sim_0: f32,
    pub clip_sim_1: f32,
    pub clip_sim_dir: f32,
    pub clip_sim_image: f32,
}

/// One record batch's columns, by name, each checked for its type.
struct Columns<'a> {
    batch: &'a RecordBatch,
    path: &'a Path,
}

impl Columns<'_> {
    fn missing(&self, c: &str) -> Error {
        Error::Parquet(format!(
            "{}: column {c} missing or of the wrong type",
            self.path.display()
        ))
    }

    fn col(&self, n: &str) -> Result<&arrow_array::ArrayRef> {
        self.batch.column_by_name(n).ok_or_else(|| self.missing(n))
    }

    fn strings(&self, n: &str) -> Result<Vec<String>> {
        let a = self
            .col(n)?
            .as_string_opt::<i32>()
            .ok_or_else(|| self.missing(n))?;
        Ok(a.iter().map(|v| v.unwrap_or_default().to_owned()).collect())
    }

    fn images(&self, n: &str) -> Result<ImageColumn> {
        let st = self
            .col(n)?
            .as_struct_opt()
            .ok_or_else(|| self.missing(n))?;
        let bytes = st
            .column_by_name("bytes")
            .and_then(|c| c.as_binary_opt::<i32>())
            .ok_or_else(|| self.missing(n))?;
        let paths = st
            .column_by_name("path")
            .and_then(|c| c.as_string_opt::<i32>())
            .ok_or_else(|| self.missing(n))?;
        Ok((
            bytes
                .iter()
                .map(|v| v.unwrap_or_default().to_vec())
                .collect(),
            paths.iter().map(|v| v.map(str::to_owned)).collect(),
        ))
    }

    fn values<T: arrow_array::ArrowPrimitiveType>(&self, n: &str) -> Result<Vec<T::Native>> {
        Ok(self
            .col(n)?
            .as_primitive_opt::<T>()
            .ok_or_else(|| self.missing(n))?
            .values()
            .to_vec())
    }

    /// Every row of the batch.
    fn rows(&self) -> Result<Vec<StoredRow>> {
        let (op, ei, ep) = (
            self.strings("original_prompt")?,
            self.strings("edit_prompt")?,
            self.strings("edited_prompt")?,
        );
        let (oi, opath) = self.images("original_image")?;
        let (di, _) = self.images("edited_image")?;
        let seeds = self.values::<Int64Type>("seed")?;
        let g = self.values::<Float64Type>("guidance_scale")?;
        let p = self.values::<Float64Type>("p2p_threshold")?;
        let [c0, c1, cd, ci] = ["clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image"]
            .map(|n| self.values::<Float32Type>(n));
        let (c0, c1, cd, ci) = (c0?, c1?, cd?, ci?);
        Ok((0..self.batch.num_rows())
            .map(|i| StoredRow {
                original_prompt: op[i].clone(),
                original_image: oi[i].clone(),
                original_path: opath[i].clone(),
                edit_prompt: ei[i].clone(),
                edited_prompt: ep[i].clone(),
                edited_image: di[i].clone(),
                seed: seeds[i],
                guidance_scale: g[i],
                p2p_threshold: p[i],
                clip_sim_0: c0[i],
                clip_sim_1: c1[i],
                clip_sim_dir: cd[i],
                clip_sim_image: ci[i],
            })
            .collect())
    }
}

/// Reads a shard back, column by column (by name, so any column order works).
pub fn read_part(path: &Path) -> Result<Vec<StoredRow>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let reader =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)?.build()?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch?;
        out.extend(
            Columns {
                batch: &batch,
                path,
            }
            .rows()?,
        );
    }
    Ok(out)
}
