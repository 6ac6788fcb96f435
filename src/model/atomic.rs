//! Files written whole or not at all: the bytes go to a temporary file in the same folder,
//! which is flushed to disk and then renamed over the final name. A reader (or a run that
//! crashed or was interrupted meanwhile) sees either the old file or the new one, never a
//! half-written one; a failed write leaves the old file as it was.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// `folder/.{name}.tmp-{pid}-{n}`: unique to the process and the call, in the same folder as
/// `path` (so the rename stays within one file system).
fn temp_path(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path.file_name().map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

/// Write `bytes` to `path` atomically: a temporary file beside it, `fsync`, rename over
/// `path`, then `fsync` of the folder so that the rename itself survives a crash. The folder
/// must exist.
///
/// Errors: the I/O error of the step that failed (the temporary file is removed; `path` is
/// untouched unless the rename happened).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let temp = temp_path(path);
    let written = (|| {
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written?;
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(folder)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata::TempDir;

    #[test]
    fn replaces_whole_file_and_leaves_no_temporary() {
        let dir = TempDir::new("atomic");
        let path = dir.join("x.bin");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second, longer").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second, longer");
        let names: Vec<_> = std::fs::read_dir(&dir.path).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["x.bin"]);
        // A folder that does not exist: an error, nothing created.
        let missing = dir.join("no/such/x.bin");
        assert!(write_atomic(&missing, b"x").is_err());
        assert!(!dir.join("no").exists());
        // A target that is a folder: the rename fails, the temporary file is removed.
        std::fs::create_dir(dir.join("d")).unwrap();
        assert!(write_atomic(&dir.join("d"), b"x").is_err());
        let mut names: Vec<_> = std::fs::read_dir(&dir.path).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, ["d", "x.bin"]);
    }
}
