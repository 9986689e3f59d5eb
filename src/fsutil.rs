//! Crash-safe writes, the one place for them: a file or a folder is written beside its
//! destination under a temporary name, fsynced and renamed into place, then the folder that
//! holds it is fsynced. A crash leaves the old version or the new one, never a torn one.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Makes a rename inside `dir` durable. Opening a folder read-only works on Unix; elsewhere
/// this is a no-op.
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// `path`'s folder and `.<name><suffix>` beside it.
fn beside(path: &Path, suffix: &str) -> (PathBuf, PathBuf) {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}{suffix}"));
    (dir, tmp)
}

/// Renames the complete (already fsynced) `tmp` over `path` and makes the rename durable.
pub fn rename_durably(tmp: &Path, path: &Path) -> Result<()> {
    std::fs::rename(tmp, path).map_err(|e| Error::io(path, e))?;
    let (dir, _) = beside(path, "");
    sync_dir(&dir)
}

/// Writes `path` all or nothing: `write` fills a temporary file beside it (a leftover one from
/// a crash is overwritten; one whose `write` failed is removed), which is fsynced and renamed
/// over `path`.
pub fn commit_file<E: From<Error>>(
    path: &Path,
    write: impl FnOnce(&mut File) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let (_, tmp) = beside(path, ".tmp");
    let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let written = write(&mut f).and_then(|()| Ok(f.sync_all().map_err(|e| Error::io(&tmp, e))?));
    drop(f);
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(rename_durably(&tmp, path)?)
}

/// [`commit_file`] with the bytes given.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    commit_file(path, |f| {
        std::io::Write::write_all(f, bytes).map_err(|e| Error::io(path, e))
    })
}

/// Makes every file under `dir` that only its owner may read (what safetensors' writer leaves,
/// through a temporary file) readable by all as well, like the rest of a model folder.
fn readable(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let path = entry.map_err(|e| Error::io(dir, e))?.path();
            let meta = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
            if meta.is_dir() {
                readable(&path)?;
            } else if meta.permissions().mode() & 0o044 == 0 {
                let mode = meta.permissions().mode() | 0o044;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                    .map_err(|e| Error::io(&path, e))?;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Makes the folder `dst` all or nothing: `build` fills a fresh temporary folder beside it
/// (removed if `build` fails; one left by a crash is cleared first), which then replaces `dst`.
pub fn commit_dir(dst: &Path, build: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    // One fixed name, so what a crashed writer left (a whole model) is removed by the next one.
    let (parent, tmp) = beside(dst, ".tmp");
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = build(&tmp).and_then(|()| readable(&tmp)) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dst.exists() {
        std::fs::remove_dir_all(dst).map_err(|e| Error::io(dst, e))?;
    }
    rename_durably(&tmp, dst)
}

/// Copies the folder `src` into `dst` (made if missing), leaving out the entries of `src` itself
/// named in `skip`; hard-links files where the file system allows (`link`), copies otherwise.
pub(crate) fn copy_tree(
    src: &std::path::Path,
    dst: &std::path::Path,
    link: bool,
    skip: &[&str],
) -> Result<()> {
    std::fs::create_dir_all(dst).map_err(|e| Error::io(dst, e))?;
    for entry in std::fs::read_dir(src).map_err(|e| Error::io(src, e))? {
        let entry = entry.map_err(|e| Error::io(src, e))?;
        let (from, name) = (entry.path(), entry.file_name());
        if skip.iter().any(|s| name == *s) {
            continue;
        }
        let to = dst.join(&name);
        if from.is_dir() {
            copy_tree(&from, &to, link, &[])?;
        } else if !(link && std::fs::hard_link(&from, &to).is_ok()) {
            std::fs::copy(&from, &to).map_err(|e| Error::io(&from, e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_and_folders_are_replaced_whole() -> Result<()> {
        let d = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let f = d.path().join("state.json");
        write_file(&f, b"one")?;
        write_file(&f, b"two")?;
        assert_eq!(std::fs::read(&f).map_err(|e| Error::io(&f, e))?, b"two");
        let failed: Result<()> = commit_file(&f, |_| Err(Error::Cancelled));
        assert!(failed.is_err());
        assert_eq!(std::fs::read(&f).map_err(|e| Error::io(&f, e))?, b"two");

        let m = d.path().join("model");
        commit_dir(&m, |t| write_file(&t.join("a"), b"1"))?;
        let failed = commit_dir(&m, |t| {
            write_file(&t.join("b"), b"2")?;
            Err(Error::Cancelled)
        });
        assert!(failed.is_err());
        assert!(
            m.join("a").is_file() && !m.join("b").exists(),
            "old folder kept"
        );
        commit_dir(&m, |t| write_file(&t.join("b"), b"2"))?;
        assert!(
            !m.join("a").exists() && m.join("b").is_file(),
            "replaced whole"
        );
        let names: Vec<_> = std::fs::read_dir(d.path())
            .map_err(|e| Error::io(d.path(), e))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "no temporary left: {names:?}");
        // What a crashed writer left is cleared by the next.
        let left = d.path().join(".model.tmp");
        std::fs::create_dir_all(&left).map_err(|e| Error::io(&left, e))?;
        write_file(&left.join("half-written"), b"x")?;
        commit_dir(&m, |t| write_file(&t.join("c"), b"3"))?;
        assert!(!left.exists() && !m.join("half-written").exists() && m.join("c").is_file());
        Ok(())
    }

    #[test]
    fn weights_in_a_committed_folder_are_readable_by_all() -> Result<()> {
        let d = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let m = d.path().join("model");
        // safetensors writes through a temporary file, which is created owner-only.
        commit_dir(&m, |t| {
            let zeros =
                candle_core::Tensor::zeros(2, candle_core::DType::F32, &candle_core::Device::Cpu)?;
            let w = std::collections::HashMap::from([("w", zeros)]);
            std::fs::create_dir_all(t.join("unet")).map_err(|e| Error::io(t, e))?;
            candle_core::safetensors::save(&w, t.join("unet/w.safetensors"))?;
            Ok(())
        })?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let p = m.join("unet/w.safetensors");
            let mode = std::fs::metadata(&p)
                .map_err(|e| Error::io(&p, e))?
                .permissions()
                .mode();
            assert_eq!(mode & 0o044, 0o044, "{mode:o}");
        }
        Ok(())
    }
}
