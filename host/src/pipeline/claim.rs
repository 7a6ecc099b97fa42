//! Claims: how several `selma run` processes share one run directory
//! without `--shard` and never do a unit twice at the same time. A worker
//! claims a unit by holding an exclusive `flock(2)` on
//! `.selma/claims/<stage>/<unit>.claim`, into which it writes its pid and
//! host (for messages only). The kernel (on NFS, the server's lock
//! manager) releases the lock when its process dies, so a dead worker's
//! claim is free at once and no staleness has to be judged; the file is
//! removed when the unit is finished or abandoned (the guard drops, also
//! on error). A worker that locks a file someone has just removed finds
//! that the name no longer points at its file and tries again, so two
//! workers never both hold one unit.

use anyhow::{Context, Result};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Who holds a claim (as its file says).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Its process id.
    pub pid: u32,
    /// Its host name.
    pub host: String,
}

impl Holder {
    /// This process.
    pub fn me() -> Self {
        Self {
            pid: std::process::id(),
            host: host_name(),
        }
    }
    fn to_line(&self) -> String {
        format!("{} {}\n", self.pid, self.host)
    }
    /// Reads `pid host`; claims of older versions (`pid start host`) too.
    fn parse(text: &str) -> Option<Self> {
        let fields: Vec<&str> = text.split_whitespace().collect();
        let pid = fields.first()?.parse().ok()?;
        Some(Self {
            pid,
            host: fields.last().filter(|_| fields.len() >= 2)?.to_string(),
        })
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} on {}", self.pid, self.host)
    }
}

/// The host's name (`/proc/sys/kernel/hostname`, else `$HOSTNAME`, else `localhost`).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

/// A held claim; dropping it removes the file and releases the lock.
#[derive(Debug)]
pub struct Guard {
    path: PathBuf,
    // Closing it releases the lock (after the file is removed).
    _file: File,
}

impl Drop for Guard {
    fn drop(&mut self) {
        // Removed while locked: a worker that opened the old file before
        // this and locks it next sees that the name is gone, and retries.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What [`try_claim`] found.
#[derive(Debug)]
pub enum Outcome {
    /// The claim is ours.
    Claimed(Guard),
    /// A live worker holds it (None: it has not written its name yet).
    Held(Option<Holder>, PathBuf),
}

/// Claims the unit whose claim file is `path` without waiting.
pub fn try_claim(path: &Path) -> Result<Outcome> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for _ in 0..8 {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("opening the claim {}", path.display()))?;
        // SAFETY: flock on a descriptor this function owns; no memory is shared.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                return Ok(Outcome::Held(Holder::parse(&text), path.to_path_buf()));
            }
            return Err(e).with_context(|| {
                format!(
                    "locking the claim {} (the file system must support flock; \
                     use --shard i/n where it does not)",
                    path.display()
                )
            });
        }
        // Is the name still this file? (Its holder may have finished and
        // removed it between our open and our lock.)
        let mine = file.metadata()?;
        match std::fs::metadata(path) {
            Ok(now) if now.ino() == mine.ino() && now.dev() == mine.dev() => {}
            _ => continue,
        }
        file.set_len(0)
            .and_then(|()| file.write_all(Holder::me().to_line().as_bytes()))
            .with_context(|| format!("writing the claim {}", path.display()))?;
        return Ok(Outcome::Claimed(Guard {
            path: path.to_path_buf(),
            _file: file,
        }));
    }
    anyhow::bail!(
        "cannot claim {}: other workers keep replacing it",
        path.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claimed(p: &Path) -> Guard {
        match try_claim(p).unwrap() {
            Outcome::Claimed(g) => g,
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn one_claim_at_a_time_released_on_drop() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c/u.claim");
        let g = claimed(&p);
        assert_eq!(
            Holder::parse(&std::fs::read_to_string(&p).unwrap()),
            Some(Holder::me())
        );
        // A second claim (another thread of this process, or another
        // process) is refused while the first is held, and names it.
        match try_claim(&p).unwrap() {
            Outcome::Held(Some(h), _) => assert_eq!(h, Holder::me()),
            o => panic!("{o:?}"),
        }
        drop(g);
        assert!(!p.exists());
        drop(claimed(&p));
    }

    #[test]
    fn an_unlocked_file_is_free_whatever_it_says() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("u.claim");
        // Left by a dead process (an old version's line), or garbage.
        for text in ["4242 12345 somehost\n", "12", ""] {
            std::fs::write(&p, text).unwrap();
            drop(claimed(&p));
        }
        assert_eq!(
            Holder::parse("4242 12345 somehost"),
            Some(Holder {
                pid: 4242,
                host: "somehost".into()
            })
        );
    }

    #[test]
    fn a_lock_on_a_removed_file_does_not_block_a_claim() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("u.claim");
        // A racing worker opened the file, the holder finished (removing
        // it), then the racer locked its stale descriptor: that lock holds
        // no name, and the next claim makes a fresh file.
        let g = claimed(&p);
        let old = std::fs::File::open(&p).unwrap();
        let old_ino = old.metadata().unwrap().ino();
        drop(g);
        // SAFETY: flock on a descriptor the test owns.
        assert_eq!(
            unsafe { libc::flock(old.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
            0
        );
        let g = claimed(&p);
        assert_ne!(std::fs::metadata(&p).unwrap().ino(), old_ino);
        drop(g);
    }
}
