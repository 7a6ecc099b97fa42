//! Several `selma run` processes on one run directory, without `--shard`:
//! they split the units (each unit is claimed before it runs, none is done
//! by two workers), the result equals one process's, a claim file left by
//! a dead worker is taken over (nobody holds its lock), and a live one is
//! waited for or, with `--no-wait`, left and named.

use crate::support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn selma() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_selma"));
    c.env(
        "SELMA_CACHE_DIR",
        support::root().join("target/selma-test-cache"),
    );
    c
}

/// 2 skills x 4 prompts x 2 images of 32 px; 24 updates per adapter.
const CONFIG: &str = r#"
[run]
seed = 11
[models]
teacher = "$RUN/model"
init_tiny = true
[prompts]
count = 4
[[skills]]
name = "general"
[[skills]]
name = "counting"
[images]
per_prompt = 2
steps = 3
width = 32
height = 32
filters = ["degenerate"]
[train]
rank = 2
alpha = 2.0
batch = 1
grad_accum = 1
lr = 1e-3
resolution = 32
save_every = 8
steps = 24
[[merge]]
strategy = "linear"
[eval]
prompts = 2
grid_prompts = 1
"#;

fn config(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join("pipeline.toml");
    std::fs::write(&p, CONFIG).unwrap();
    p
}

fn start(cfg: &Path, run: &Path, extra: &[&str]) -> std::process::Child {
    selma()
        .args(["run", cfg.to_str().unwrap(), "--run-dir"])
        .arg(run)
        .arg("-q")
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(c: std::process::Child) -> Output {
    let out = c.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "selma run failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// The units an invocation ran, from its "ran N unit(s) in ...: a, b" line.
fn ran_units(o: &Output) -> Vec<String> {
    stderr(o)
        .lines()
        .find(|l| l.starts_with("ran "))
        .and_then(|l| l.split_once(": "))
        .map(|(_, list)| list.split(", ").map(|s| s.to_string()).collect())
        .unwrap_or_default()
}

/// The tensors of a safetensors file (header without `__metadata__`, data).
fn tensors(path: &Path) -> (serde_json::Value, Vec<u8>) {
    let b = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    header.as_object_mut().unwrap().remove("__metadata__");
    (header, b[8 + n..].to_vec())
}

/// Claim files left in a run directory.
fn claims(run: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut stack = vec![run.join(".selma/claims")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn two_workers_split_the_units_and_match_one_worker() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let alone = tmp.path().join("alone");
    let one = finish(start(&cfg, &alone, &[]));
    let all: BTreeSet<String> = ran_units(&one).into_iter().collect();
    assert!(all.len() > 20, "{all:?}");

    let shared = tmp.path().join("shared");
    let (a, b) = (start(&cfg, &shared, &[]), start(&cfg, &shared, &[]));
    let (a, b) = (finish(a), finish(b));
    let (ra, rb) = (ran_units(&a), ran_units(&b));
    let (sa, sb): (BTreeSet<String>, BTreeSet<String>) =
        (ra.iter().cloned().collect(), rb.iter().cloned().collect());
    assert_eq!(sa.len(), ra.len(), "a unit ran twice in one worker");
    assert!(
        sa.is_disjoint(&sb),
        "units done by both workers: {:?}",
        sa.intersection(&sb).collect::<Vec<_>>()
    );
    let union: BTreeSet<String> = sa.union(&sb).cloned().collect();
    assert_eq!(union, all, "the two workers did not do every unit once");
    eprintln!(
        "worker a ran {} unit(s), worker b {} (of {})",
        sa.len(),
        sb.len(),
        all.len()
    );
    for f in [
        "experts/general.safetensors",
        "experts/counting.safetensors",
        "merged/linear.safetensors",
    ] {
        assert_eq!(tensors(&shared.join(f)), tensors(&alone.join(f)), "{f}");
    }
    assert_eq!(
        std::fs::read(shared.join("results.json")).unwrap(),
        std::fs::read(alone.join("results.json")).unwrap()
    );
    assert!(claims(&shared).is_empty(), "{:?}", claims(&shared));
}

#[test]
fn stale_claims_are_taken_over_and_live_ones_waited_for() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let run = tmp.path().join("run");
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string();
    let claim = |stage: &str, unit: &str| run.join(format!(".selma/claims/{stage}/{unit}.claim"));

    // A claim file left by a finished process: nobody holds its lock.
    let mut gone = Command::new("true").spawn().unwrap();
    let gone_pid = gone.id();
    gone.wait().unwrap();
    let stale = claim("prompts", "prompts-general");
    std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
    std::fs::write(&stale, format!("{gone_pid} {host}\n")).unwrap();

    // A claim of a live process on the report (flock(1) holds the lock
    // until it is killed; -o keeps the lock out of its child): left with
    // --no-wait.
    let live = claim("report", "report");
    std::fs::create_dir_all(live.parent().unwrap()).unwrap();
    let mut holder = Command::new("flock")
        .args(["-o", live.to_str().unwrap(), "sleep", "60"])
        .spawn()
        .expect("flock(1) from util-linux");
    std::fs::write(&live, format!("{} {host}\n", holder.id())).unwrap();
    // Until flock has its lock, the file is free: wait for it.
    let t0 = std::time::Instant::now();
    while Command::new("flock")
        .args(["-n", live.to_str().unwrap(), "true"])
        .status()
        .unwrap()
        .success()
    {
        assert!(t0.elapsed().as_secs() < 10, "flock(1) never took its lock");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    let out = finish(start(&cfg, &run, &["--no-wait"]));
    let ran = ran_units(&out);
    assert!(ran.contains(&"prompts:general".to_string()), "{ran:?}");
    assert!(!ran.contains(&"report".to_string()), "{ran:?}");
    let err = stderr(&out);
    assert!(
        err.contains("report: claimed by another worker")
            && err.contains(&format!("pid {}", holder.id())),
        "{err}"
    );
    assert!(!run.join("report.html").exists());

    // Waiting: the run finishes once the holder is gone.
    let waiter = start(&cfg, &run, &[]);
    std::thread::sleep(std::time::Duration::from_millis(2500));
    holder.kill().unwrap();
    holder.wait().unwrap();
    let out = finish(waiter);
    assert_eq!(ran_units(&out), vec!["report".to_string()]);
    assert!(
        stderr(&out).contains("waiting for 1 unit(s) that other workers are running: report"),
        "{}",
        stderr(&out)
    );
    assert!(run.join("report.html").is_file());
    assert!(claims(&run).is_empty(), "{:?}", claims(&run));
}

#[test]
fn ctrl_c_says_how_to_resume_and_the_resumed_run_finishes() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let run = tmp.path().join("run");
    let c = start(&cfg, &run, &[]);
    // Interrupt once the run is under way (its plan is written).
    let t0 = std::time::Instant::now();
    while !run.join(".selma/plan.json").is_file() {
        assert!(t0.elapsed().as_secs() < 60, "the run never started");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    unsafe {
        libc::kill(c.id() as i32, libc::SIGINT);
    }
    let out = c.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    let err = stderr(&out);
    let want = format!(
        "interrupted: finished units are kept; resume with: selma run {} --run-dir {}",
        cfg.display(),
        run.display()
    );
    assert!(err.contains(&want), "{err}");
    finish(start(&cfg, &run, &[]));
    assert!(run.join("report.html").is_file());
}
