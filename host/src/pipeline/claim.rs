//! Claims: how several `selma run` processes share one run directory
//! without `--shard` and never do a unit twice at the same time. A worker
//! claims a unit by creating `.selma/claims/<stage>/<unit>.claim` as a hard
//! link (atomic on local and NFS file systems), holding its pid, host
//! and the process's start time; the claim is removed when the unit is
//! finished or abandoned (the guard drops, also on error). A claim whose
//! process is gone (same host: no such pid, or a pid reused by a later
//! process) is stale and taken over. Claims from other hosts are taken as
//! live: on a cluster a dead node's claims are removed by deleting the file
//! (the message names it).

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// Who holds a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Its process id.
    pub pid: u32,
    /// Its host name.
    pub host: String,
    /// The process's start time (clock ticks since boot, from /proc), 0 if unknown.
    pub start: u64,
}

impl Holder {
    /// This process.
    pub fn me() -> Self {
        let pid = std::process::id();
        Self {
            pid,
            host: host_name(),
            start: process_start(pid).unwrap_or(0),
        }
    }
    fn to_line(&self) -> String {
        format!("{} {} {}\n", self.pid, self.start, self.host)
    }
    fn parse(text: &str) -> Option<Self> {
        let mut it = text.trim().splitn(3, ' ');
        Some(Self {
            pid: it.next()?.parse().ok()?,
            start: it.next()?.parse().ok()?,
            host: it.next()?.to_string(),
        })
    }
    /// Is the holder still running? (Other hosts' holders count as alive.)
    pub fn alive(&self) -> bool {
        if self.host != host_name() {
            return true;
        }
        match process_start(self.pid) {
            None => false,
            Some(s) => self.start == 0 || s == self.start,
        }
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

/// A process's start time in clock ticks since boot (field 22 of
/// `/proc/<pid>/stat`); None when there is no such process.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// A held claim; dropping it releases the unit.
#[derive(Debug)]
pub struct Guard {
    path: PathBuf,
    me: Holder,
}

impl Drop for Guard {
    fn drop(&mut self) {
        // Remove it only while it is still ours (never another worker's
        // claim that replaced a stale one).
        let ours = std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|t| Holder::parse(&t))
            .is_some_and(|h| h == self.me);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// What [`try_claim`] found.
#[derive(Debug)]
pub enum Outcome {
    /// The claim is ours.
    Claimed(Guard),
    /// A live worker holds it.
    Held(Holder, PathBuf),
}

/// Claims the unit whose claim file is `path`, taking over a stale claim.
pub fn try_claim(path: &Path) -> Result<Outcome> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let me = Holder::me();
    // The claim is written in full to a temp file, then hard-linked to its
    // name (atomic, fails if the name exists): nobody sees a claim half written.
    let tmp = selma_io::temp_path(path)?;
    std::fs::write(&tmp, me.to_line())
        .with_context(|| format!("writing the claim {}", tmp.display()))?;
    let out = claim_via(&tmp, path, &me);
    let _ = std::fs::remove_file(&tmp);
    out
}

fn claim_via(tmp: &Path, path: &Path, me: &Holder) -> Result<Outcome> {
    for _ in 0..3 {
        match std::fs::hard_link(tmp, path) {
            Ok(()) => {
                return Ok(Outcome::Claimed(Guard {
                    path: path.to_path_buf(),
                    me: me.clone(),
                }));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                match Holder::parse(&text) {
                    Some(h) if &h == me => {
                        // Left by this very process (a unit claimed twice
                        // in one invocation): still ours.
                        return Ok(Outcome::Claimed(Guard {
                            path: path.to_path_buf(),
                            me: me.clone(),
                        }));
                    }
                    Some(h) if h.alive() => return Ok(Outcome::Held(h, path.to_path_buf())),
                    // Stale, or unreadable (not written by selma): take
                    // it over (if another worker removed it first,
                    // the next attempt's create_new decides).
                    _ => {
                        let _ = std::fs::remove_file(path);
                    }
                }
            }
            Err(e) => {
                return Err(e).with_context(|| format!("creating the claim {}", path.display()))
            }
        }
    }
    anyhow::bail!(
        "cannot claim {}: other workers keep replacing it",
        path.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_claim_at_a_time_released_on_drop() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c/u.claim");
        let g = match try_claim(&p).unwrap() {
            Outcome::Claimed(g) => g,
            o => panic!("{o:?}"),
        };
        assert!(p.is_file());
        drop(g);
        assert!(!p.exists());
    }

    #[test]
    fn a_live_holder_keeps_its_claim_and_a_dead_one_loses_it() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("u.claim");
        // A live process of this host: our parent (pid 1 may be hidden in
        // some sandboxes, but some process always has a start time).
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let live = Holder {
            pid: child.id(),
            host: host_name(),
            start: process_start(child.id()).unwrap(),
        };
        std::fs::write(&p, live.to_line()).unwrap();
        match try_claim(&p).unwrap() {
            Outcome::Held(h, _) => assert_eq!(h, live),
            o => panic!("{o:?}"),
        }
        // The same pid with another start time is a reused pid: stale.
        let reused = Holder {
            start: live.start + 1,
            ..live.clone()
        };
        std::fs::write(&p, reused.to_line()).unwrap();
        assert!(matches!(try_claim(&p).unwrap(), Outcome::Claimed(_)));
        child.kill().unwrap();
        child.wait().unwrap();
        // A finished process is gone: its claim is taken over.
        std::fs::write(&p, live.to_line()).unwrap();
        assert!(matches!(try_claim(&p).unwrap(), Outcome::Claimed(_)));
        // Garbage is stale too.
        std::fs::write(&p, "12").unwrap();
        assert!(matches!(try_claim(&p).unwrap(), Outcome::Claimed(_)));
        // Another host's claim is not ours to judge.
        let remote = Holder {
            host: format!("{}-elsewhere", host_name()),
            ..live
        };
        std::fs::write(&p, remote.to_line()).unwrap();
        assert!(matches!(try_claim(&p).unwrap(), Outcome::Held(..)));
    }
}
