//! The bottom of selma's crate graph: every file that selma writes goes
//! through here, so that a reader (or a re-run after kill -9) sees either
//! the old file or the complete new one, never a partial file under its
//! final name. Also JSON lines and the identity of a model folder.
//!
//! Temporary names (`.NAME.tmp-PID-N-HOST`) carry the process id, a
//! per-process counter and a tag of the host, so two threads or two
//! processes writing the same path never share a temp file, and the temp
//! files of a killed process can be told apart and swept
//! ([`sweep_stale_temps`]).

use anyhow::{Context, Result};
use serde::{de::DeserializeOwned, Serialize};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Marker in every temporary name (`.NAME.tmp-PID-N-HOST`): what a cleaner
/// or a test looks for.
pub const TMP_MARKER: &str = ".tmp-";

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Eight hex digits naming this host (FNV-1a of its name) in temp names.
fn host_tag() -> &'static str {
    static TAG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TAG.get_or_init(|| {
        let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_default();
        let mut h: u32 = 0x811c_9dc5;
        for b in name.trim().bytes() {
            h = (h ^ b as u32).wrapping_mul(0x0100_0193);
        }
        format!("{h:08x}")
    })
}

/// The folder that holds `path` (`.` for a bare file name).
fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// A fresh temporary path beside `path`, unique across threads and processes.
pub fn temp_path(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    Ok(parent_of(path).join(format!(
        ".{}{TMP_MARKER}{}-{n}-{}",
        name.to_string_lossy(),
        std::process::id(),
        host_tag()
    )))
}

/// The process id in a temp name this host's processes wrote, if `name` is one.
fn temp_owner(name: &str) -> Option<u32> {
    if !name.starts_with('.') {
        return None;
    }
    let tail = &name[name.rfind(TMP_MARKER)? + TMP_MARKER.len()..];
    let mut parts = tail.split('-');
    let pid = parts.next()?.parse().ok()?;
    parts.next()?.parse::<u64>().ok()?;
    (parts.next()? == host_tag() && parts.next().is_none()).then_some(pid)
}

/// Removes, under `root` (recursively), the temp files and folders that
/// processes of this host left when they died (killed mid-write): those
/// whose process no longer runs. Returns how many were removed. Does
/// nothing where `/proc` is missing (no way to tell a live writer).
pub fn sweep_stale_temps(root: &Path) -> Result<usize> {
    if !Path::new("/proc/self").exists() {
        return Ok(0);
    }
    let me = std::process::id();
    let mut removed = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().to_string();
            let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
            match temp_owner(&name) {
                Some(pid) if pid != me && !Path::new(&format!("/proc/{pid}")).exists() => {
                    let res = if is_dir {
                        std::fs::remove_dir_all(&p)
                    } else {
                        std::fs::remove_file(&p)
                    };
                    if res.is_ok() {
                        removed += 1;
                    }
                }
                Some(_) => {}
                None if is_dir => stack.push(p),
                None => {}
            }
        }
    }
    Ok(removed)
}

/// Best-effort fsync of a folder, so a rename inside it survives power loss.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Renames `tmp` over `path` and syncs the folder; removes `tmp` on failure.
pub fn commit(tmp: &Path, path: &Path) -> Result<()> {
    if let Err(e) = std::fs::rename(tmp, path) {
        let _ = std::fs::remove_file(tmp);
        return Err(e).with_context(|| {
            format!(
                "cannot move {} into place as {}",
                tmp.display(),
                path.display()
            )
        });
    }
    sync_dir(parent_of(path));
    Ok(())
}

/// Writes a file atomically through `write`: a buffered temp file beside
/// `path` (its folder is created), flushed and fsynced, then renamed over
/// `path`. On any error the temp file is removed and the error names `path`.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> Result<()>,
) -> Result<()> {
    let dir = parent_of(path);
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create folder {}", dir.display()))?;
    let tmp = temp_path(path)?;
    let res = (|| -> Result<()> {
        let f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = BufWriter::new(f);
        write(&mut w)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        test_disk::charge(f.metadata()?.len())?;
        Ok(())
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("cannot write {}", path.display())));
    }
    commit(&tmp, path)
}

/// A test hook: `SELMA_TEST_DISK_BYTES=N` makes this process's crash-safe
/// writes fail with ENOSPC ("No space left on device") once they have
/// written N bytes in all, as on a full disk (the file that crosses the
/// limit fails after its bytes reached the temp file).
mod test_disk {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    static USED: AtomicU64 = AtomicU64::new(0);

    fn limit() -> Option<u64> {
        static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
        *LIMIT.get_or_init(|| {
            std::env::var("SELMA_TEST_DISK_BYTES")
                .ok()
                .and_then(|v| v.parse().ok())
        })
    }

    /// Counts `n` written bytes; an ENOSPC error past the limit.
    pub fn charge(n: u64) -> std::io::Result<()> {
        let Some(limit) = limit() else {
            return Ok(());
        };
        if USED.fetch_add(n, Ordering::Relaxed) + n > limit {
            return Err(std::io::Error::from_raw_os_error(28));
        }
        Ok(())
    }
}

/// Writes `bytes` to `path` atomically (see [`write_atomic_with`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| Ok(w.write_all(bytes)?))
}

/// Writes `v` as pretty JSON with a final newline, atomically.
pub fn write_json<T: Serialize + ?Sized>(path: &Path, v: &T) -> Result<()> {
    write_atomic_with(path, |w| {
        serde_json::to_writer_pretty(&mut *w, v)?;
        w.write_all(b"\n")?;
        Ok(())
    })
}

/// Writes `rows` as JSON lines (one compact object a line), atomically.
pub fn write_jsonl<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    write_atomic_with(path, |w| {
        for r in rows {
            serde_json::to_writer(&mut *w, r)?;
            w.write_all(b"\n")?;
        }
        Ok(())
    })
}

/// Parses JSON lines (blank lines skipped); an error names `origin` and the line.
pub fn parse_jsonl<T: DeserializeOwned>(text: &str, origin: &Path) -> Result<Vec<T>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}:{}: bad JSON line", origin.display(), i + 1))
        })
        .collect()
}

/// Reads a JSON-lines file (see [`parse_jsonl`]).
pub fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_jsonl(&text, path)
}

/// Reads a JSON file; an error names the file.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: bad JSON", path.display()))
}

/// Identity of a model folder (or of some of its part folders): a SHA-256
/// over every file's relative path, the bytes of small text files (`.json`,
/// `.txt`) and the size and modification time of every other file (hashing
/// gigabytes of weights on every run would be too slow). `parts = None`
/// covers the whole folder; `Some(names)` only those subfolders (missing ones
/// are skipped) plus `model_index.json`.
pub fn model_identity(dir: &Path, parts: Option<&[&str]>) -> Result<String> {
    let mut files = vec![];
    let mut stack: Vec<PathBuf> = match parts {
        None => vec![dir.to_path_buf()],
        Some(names) => {
            let index = dir.join("model_index.json");
            if index.is_file() {
                files.push(index);
            }
            names
                .iter()
                .map(|n| dir.join(n))
                .filter(|p| p.is_dir())
                .collect()
        }
    };
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let p = e
                .with_context(|| format!("listing {}", d.display()))?
                .path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut h = Sha256::new();
    for p in files {
        let rel = p
            .strip_prefix(dir)
            .unwrap_or(&p)
            .to_string_lossy()
            .to_string();
        h.update(rel.as_bytes());
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
        if matches!(ext, "json" | "txt") {
            h.update(std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?);
        } else {
            let md = std::fs::metadata(&p).with_context(|| format!("reading {}", p.display()))?;
            h.update(md.len().to_le_bytes());
            if let Ok(t) = md.modified() {
                if let Ok(d) = t.duration_since(std::time::UNIX_EPOCH) {
                    h.update(d.as_nanos().to_le_bytes());
                }
            }
        }
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.contains(TMP_MARKER))
            .collect()
    }

    #[test]
    fn write_then_read_round_trips_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/a.jsonl");
        let rows = vec![serde_json::json!({"a": 1}), serde_json::json!({"b": "x"})];
        write_jsonl(&p, &rows).unwrap();
        let back: Vec<serde_json::Value> = read_jsonl(&p).unwrap();
        assert_eq!(back, rows);
        write_json(&d.path().join("b.json"), &rows).unwrap();
        let v: Vec<serde_json::Value> = read_json(&d.path().join("b.json")).unwrap();
        assert_eq!(v, rows);
        assert!(leftovers(p.parent().unwrap()).is_empty());
    }

    #[test]
    fn a_failed_writer_keeps_the_old_file_and_removes_its_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f.bin");
        write_atomic(&p, b"old").unwrap();
        let err = write_atomic_with(&p, |w| {
            w.write_all(b"partial")?;
            anyhow::bail!("disk full")
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("f.bin"), "{err:#}");
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert!(leftovers(d.path()).is_empty());
    }

    #[test]
    fn temp_names_differ_across_threads_and_calls() {
        let p = Path::new("/x/y.txt");
        let names: Vec<PathBuf> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8).map(|_| s.spawn(|| temp_path(p).unwrap())).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut uniq = names.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), names.len());
    }

    #[test]
    fn many_threads_writing_one_path_leave_one_complete_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("shared.txt");
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let p = &p;
                s.spawn(move || {
                    for _ in 0..20 {
                        write_atomic(p, &vec![b'a' + t; 4096]).unwrap();
                    }
                });
            }
        });
        let got = std::fs::read(&p).unwrap();
        assert_eq!(got.len(), 4096);
        assert!(got.iter().all(|&b| b == got[0]));
        assert!(leftovers(d.path()).is_empty());
    }

    #[test]
    fn temps_of_dead_processes_are_swept_and_live_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        let sub = d.path().join("a/b");
        std::fs::create_dir_all(&sub).unwrap();
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let dead = gone.id();
        gone.wait().unwrap();
        let tag = host_tag();
        let dead_file = sub.join(format!(".x.png.tmp-{dead}-3-{tag}"));
        let dead_dir = d.path().join(format!(".model.tmp-{dead}-0-{tag}"));
        let mine = sub.join(format!(".y.tmp-{}-1-{tag}", std::process::id()));
        let other_host = sub.join(format!(".z.tmp-{dead}-1-00000000"));
        let not_temp = sub.join("x.png");
        for f in [&dead_file, &mine, &other_host, &not_temp] {
            std::fs::write(f, b"x").unwrap();
        }
        std::fs::create_dir_all(dead_dir.join("unet")).unwrap();
        std::fs::write(dead_dir.join("unet/w"), b"x").unwrap();
        assert_eq!(
            temp_owner(
                &temp_path(&not_temp)
                    .unwrap()
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
            ),
            Some(std::process::id())
        );
        assert_eq!(sweep_stale_temps(d.path()).unwrap(), 2);
        assert!(!dead_file.exists() && !dead_dir.exists());
        assert!(mine.exists() && other_host.exists() && not_temp.exists());
    }

    #[test]
    fn parse_errors_name_the_file_and_line() {
        let err =
            parse_jsonl::<serde_json::Value>("{}\n\n{oops\n", Path::new("m.jsonl")).unwrap_err();
        assert!(format!("{err:#}").contains("m.jsonl:3"), "{err:#}");
    }

    #[test]
    fn model_identity_sees_text_content_and_weight_size_only_in_its_parts() {
        let d = tempfile::tempdir().unwrap();
        let m = d.path();
        std::fs::create_dir_all(m.join("unet")).unwrap();
        std::fs::create_dir_all(m.join("vae")).unwrap();
        std::fs::write(m.join("model_index.json"), "{}").unwrap();
        std::fs::write(m.join("unet/config.json"), "{\"a\":1}").unwrap();
        std::fs::write(m.join("vae/w.safetensors"), [0u8; 8]).unwrap();
        let all = model_identity(m, None).unwrap();
        let vae = model_identity(m, Some(&["vae"])).unwrap();
        std::fs::write(m.join("unet/config.json"), "{\"a\":2}").unwrap();
        assert_ne!(model_identity(m, None).unwrap(), all);
        assert_eq!(model_identity(m, Some(&["vae"])).unwrap(), vae);
        std::fs::write(m.join("vae/w.safetensors"), [0u8; 9]).unwrap();
        assert_ne!(model_identity(m, Some(&["vae"])).unwrap(), vae);
    }
}
