//! Crash-safe files: atomic commits and append-only JSON-lines logs.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};

pub use ip2p::fsutil::commit_file;

/// An append-only JSON-lines file. Each append is one `write` of a whole line followed by
/// `fsync`; on opening, a torn last line (a crash mid-append) is cut off.
#[derive(Debug)]
pub struct JsonlLog {
    path: PathBuf,
    file: File,
}

impl JsonlLog {
    /// Opens (creating) the log and returns the entries already in it.
    pub fn open<T: DeserializeOwned>(path: &Path) -> Result<(Self, Vec<T>)> {
        let io = |e| Error::io(path, e);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io)?;
        let mut entries = Vec::new();
        let mut good_len = 0u64;
        {
            let mut reader = BufReader::new(&file);
            let mut line = String::new();
            let mut offset = 0u64;
            loop {
                line.clear();
                let n = reader.read_line(&mut line).map_err(io)?;
                if n == 0 {
                    break;
                }
                offset += n as u64;
                if !line.ends_with('\n') {
                    break; // torn tail
                }
                match serde_json::from_str::<T>(line.trim_end()) {
                    Ok(v) => {
                        entries.push(v);
                        good_len = offset;
                    }
                    Err(e) => {
                        return Err(Error::Input {
                            path: path.to_path_buf(),
                            message: format!("corrupt entry at byte {}: {e}", offset - n as u64),
                        })
                    }
                }
            }
        }
        let len = file.metadata().map_err(io)?.len();
        if len != good_len {
            tracing::warn!(path = %path.display(), cut = len - good_len, "cutting a torn last line");
            file.set_len(good_len).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        file.seek(SeekFrom::End(0)).map_err(io)?;
        Ok((
            Self {
                path: path.to_path_buf(),
                file,
            },
            entries,
        ))
    }

    /// Appends one entry durably.
    pub fn append<T: Serialize>(&mut self, entry: &T) -> Result<()> {
        let mut line = serde_json::to_string(entry)
            .map_err(|e| Error::Config(format!("serialising a log entry: {e}")))?;
        line.push('\n');
        let io = |e| Error::io(&self.path, e);
        self.file.write_all(line.as_bytes()).map_err(io)?;
        self.file.sync_data().map_err(io)
    }
}

/// An exclusive lock on `path`, held until dropped.
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

impl Lock {
    pub fn acquire(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(Error::Locked {
                path: path.to_path_buf(),
            }),
            Err(std::fs::TryLockError::Error(e)) => Err(Error::io(path, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_last_line_is_cut_and_appends_continue() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let p = dir.path().join("log.jsonl");
        {
            let (mut log, prev) = JsonlLog::open::<u32>(&p)?;
            assert!(prev.is_empty());
            log.append(&1u32)?;
            log.append(&2u32)?;
        }
        // A crash in the middle of writing the third line.
        let mut f = OpenOptions::new()
            .append(true)
            .open(&p)
            .map_err(|e| Error::io(&p, e))?;
        f.write_all(b"3").map_err(|e| Error::io(&p, e))?;
        drop(f);
        let (mut log, prev) = JsonlLog::open::<u32>(&p)?;
        assert_eq!(prev, vec![1, 2]);
        log.append(&4u32)?;
        drop(log);
        let (_, all) = JsonlLog::open::<u32>(&p)?;
        assert_eq!(all, vec![1, 2, 4]);
        Ok(())
    }

    #[test]
    fn commit_replaces_whole_files_and_the_lock_is_exclusive() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let p = dir.path().join("a.bin");
        commit_file(&p, |f| f.write_all(b"one").map_err(|e| Error::io("a", e)))?;
        commit_file(&p, |f| f.write_all(b"two").map_err(|e| Error::io("a", e)))?;
        assert_eq!(std::fs::read(&p).map_err(|e| Error::io(&p, e))?, b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .map_err(|e| Error::io("d", e))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
        let l = dir.path().join("x.lock");
        let held = Lock::acquire(&l)?;
        assert!(matches!(Lock::acquire(&l), Err(Error::Locked { .. })));
        drop(held);
        Lock::acquire(&l)?;
        Ok(())
    }
}
