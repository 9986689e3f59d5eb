//! Reading captions and triples: text lines, JSONL, or Parquet.
//!
//! A record with an edit and an edited caption is a finished *triple* (the paper's released
//! format: `input` or `caption`, `edit`, `output`) and skips the LLM; anything else is a caption
//! the LLM will write an edit for.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::{Array, RecordBatch};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A caption, its edit instruction and the edited caption.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Triple {
    #[serde(alias = "caption")]
    pub input: String,
    pub edit: String,
    pub output: String,
}

/// One unit of work, numbered in input order after de-duplication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub index: usize,
    pub caption: String,
    /// Already written (by a person or an earlier LLM run).
    pub triple: Option<Triple>,
}

/// What reading the inputs found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct InputStats {
    pub records: usize,
    pub duplicates: usize,
    pub empty: usize,
}

/// Which Parquet/JSON fields hold the caption (first present wins).
pub const CAPTION_FIELDS: &[&str] = &[
    "caption",
    "input",
    "text",
    "TEXT",
    "prompt",
    "original_prompt",
];
const EDIT_FIELDS: &[&str] = &["edit", "edit_prompt", "instruction"];
const OUTPUT_FIELDS: &[&str] = &["output", "edited_prompt", "edited_caption"];

#[derive(Debug, Clone)]
struct Raw {
    caption: String,
    edit: Option<String>,
    output: Option<String>,
}

/// The key captions are de-duplicated by: case and runs of whitespace do not matter.
pub fn dedupe_key(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// Reads every input file, in order, de-duplicating captions (a triple is a duplicate only of
/// the same caption with the same edit).
pub fn read_inputs(
    paths: &[impl AsRef<Path>],
    caption_column: Option<&str>,
) -> Result<(Vec<Item>, InputStats)> {
    let mut stats = InputStats::default();
    let mut seen = HashSet::new();
    let mut items = Vec::new();
    for p in paths {
        let p = p.as_ref();
        for raw in read_file(p, caption_column)? {
            stats.records += 1;
            let caption = raw.caption.trim().to_owned();
            if caption.is_empty() {
                stats.empty += 1;
                continue;
            }
            let triple = match (raw.edit, raw.output) {
                (Some(e), Some(o)) if !e.trim().is_empty() && !o.trim().is_empty() => {
                    Some(Triple {
                        input: caption.clone(),
                        edit: e.trim().to_owned(),
                        output: o.trim().to_owned(),
                    })
                }
                _ => None,
            };
            let key = match &triple {
                Some(t) => format!("{}\u{1f}{}", dedupe_key(&caption), dedupe_key(&t.edit)),
                None => dedupe_key(&caption),
            };
            if !seen.insert(key) {
                stats.duplicates += 1;
                continue;
            }
            items.push(Item {
                index: items.len(),
                caption,
                triple,
            });
        }
    }
    Ok((items, stats))
}

fn read_file(path: &Path, caption_column: Option<&str>) -> Result<Vec<Raw>> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "parquet" => read_parquet(path, caption_column),
        "jsonl" | "json" | "ndjson" => read_jsonl(path, caption_column),
        _ => read_lines(path),
    }
}

fn open(path: &Path) -> Result<File> {
    File::open(path).map_err(|e| Error::io(path, e))
}

fn read_lines(path: &Path) -> Result<Vec<Raw>> {
    let mut out = Vec::new();
    for line in BufReader::new(open(path)?).lines() {
        let line = line.map_err(|e| Error::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(Raw {
            caption: line,
            edit: None,
            output: None,
        });
    }
    Ok(out)
}

fn pick<'a>(
    obj: &'a serde_json::Map<String, serde_json::Value>,
    names: &[&str],
) -> Option<&'a str> {
    names
        .iter()
        .find_map(|n| obj.get(*n).and_then(|v| v.as_str()))
}

fn read_jsonl(path: &Path, caption_column: Option<&str>) -> Result<Vec<Raw>> {
    let mut out = Vec::new();
    let cols: Vec<&str> = match caption_column {
        Some(c) => vec![c],
        None => CAPTION_FIELDS.to_vec(),
    };
    for (n, line) in BufReader::new(open(path)?).lines().enumerate() {
        let line = line.map_err(|e| Error::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |m: String| Error::Input {
            path: path.to_path_buf(),
            message: format!("line {}: {m}", n + 1),
        };
        let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| bad(e.to_string()))?;
        let obj = match &v {
            serde_json::Value::Object(o) => o,
            serde_json::Value::String(s) => {
                out.push(Raw {
                    caption: s.clone(),
                    edit: None,
                    output: None,
                });
                continue;
            }
            _ => return Err(bad("expected an object or a string".into())),
        };
        let caption = pick(obj, &cols)
            .ok_or_else(|| bad(format!("no caption field (one of {})", cols.join(", "))))?;
        out.push(Raw {
            caption: caption.to_owned(),
            edit: pick(obj, EDIT_FIELDS).map(str::to_owned),
            output: pick(obj, OUTPUT_FIELDS).map(str::to_owned),
        });
    }
    Ok(out)
}

fn string_column(batch: &RecordBatch, name: &str) -> Option<Vec<Option<String>>> {
    let col = batch.column_by_name(name)?;
    let get = |i: usize| -> Option<String> {
        if col.is_null(i) {
            return None;
        }
        if let Some(a) = col.as_string_opt::<i32>() {
            return Some(a.value(i).to_owned());
        }
        if let Some(a) = col.as_string_opt::<i64>() {
            return Some(a.value(i).to_owned());
        }
        col.as_string_view_opt().map(|a| a.value(i).to_owned())
    };
    if col.as_string_opt::<i32>().is_none()
        && col.as_string_opt::<i64>().is_none()
        && col.as_string_view_opt().is_none()
    {
        return None;
    }
    Some((0..col.len()).map(get).collect())
}

fn read_parquet(path: &Path, caption_column: Option<&str>) -> Result<Vec<Raw>> {
    let builder =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(open(path)?)?;
    let schema = builder.schema().clone();
    let names: Vec<&str> = match caption_column {
        Some(c) => vec![c],
        None => CAPTION_FIELDS.to_vec(),
    };
    let first_of = |cands: &[&str]| -> Option<String> {
        cands
            .iter()
            .find(|c| schema.field_with_name(c).is_ok())
            .map(|c| c.to_string())
    };
    let cap = first_of(&names).ok_or_else(|| Error::Input {
        path: path.to_path_buf(),
        message: format!(
            "no caption column (one of {}; choose one with --caption-column)",
            names.join(", ")
        ),
    })?;
    let edit = first_of(EDIT_FIELDS);
    let output = first_of(OUTPUT_FIELDS);
    let mut out = Vec::new();
    for batch in builder.build()? {
        let batch = batch?;
        let caps = string_column(&batch, &cap).ok_or_else(|| Error::Input {
            path: path.to_path_buf(),
            message: format!("column {cap} is not a string column"),
        })?;
        let edits = edit.as_deref().and_then(|e| string_column(&batch, e));
        let outs = output.as_deref().and_then(|o| string_column(&batch, o));
        for (i, c) in caps.into_iter().enumerate() {
            out.push(Raw {
                caption: c.unwrap_or_default(),
                edit: edits.as_ref().and_then(|e| e[i].clone()),
                output: outs.as_ref().and_then(|o| o[i].clone()),
            });
        }
    }
    Ok(out)
}

/// The items shard `shard` of `num_shards` owns: every `num_shards`-th item, starting at
/// `shard` (deterministic, balanced, independent of how far other shards got).
pub fn shard_items(items: &[Item], shard: usize, num_shards: usize) -> Vec<Item> {
    items
        .iter()
        .filter(|it| it.index % num_shards.max(1) == shard)
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_lines_jsonl_and_triples_with_dedupe() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let txt = dir.path().join("c.txt");
        std::fs::write(&txt, "a red car\n\n  A  red car \nthe sea\n")
            .map_err(|e| Error::io(&txt, e))?;
        let jl = dir.path().join("t.jsonl");
        std::fs::write(
            &jl,
            concat!(
                r#"{"input": "a cat", "edit": "make it a dog", "output": "a dog"}"#,
                "\n",
                r#"{"caption": "a cat", "edit": "make it a dog", "output": "a dog"}"#,
                "\n",
                r#"{"caption": "a cat", "edit": "add a hat", "output": "a cat in a hat"}"#,
                "\n",
                r#"{"text": "a bridge"}"#,
                "\n"
            ),
        )
        .map_err(|e| Error::io(&jl, e))?;
        let (items, stats) = read_inputs(&[&txt, &jl], None)?;
        assert_eq!(stats.records, 7);
        assert_eq!(stats.duplicates, 2);
        let caps: Vec<&str> = items.iter().map(|i| i.caption.as_str()).collect();
        assert_eq!(caps, ["a red car", "the sea", "a cat", "a cat", "a bridge"]);
        assert!(items[2].triple.is_some() && items[4].triple.is_none());
        assert_eq!(
            items.iter().map(|i| i.index).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4]
        );
        let s0 = shard_items(&items, 0, 2);
        let s1 = shard_items(&items, 1, 2);
        assert_eq!(s0.len() + s1.len(), items.len());
        assert!(s0.iter().all(|i| i.index % 2 == 0));
        Ok(())
    }

    #[test]
    fn a_malformed_jsonl_line_is_named() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("x.jsonl");
        std::fs::write(&p, "{\"caption\": \"ok\"}\n{oops\n").expect("write");
        let e = read_inputs(&[&p], None).expect_err("must fail").to_string();
        assert!(e.contains("line 2"), "{e}");
    }
}
