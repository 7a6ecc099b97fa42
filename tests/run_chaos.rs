//! Chaos: `selma run` on a small config, killed with SIGKILL at seeded
//! random moments in every stage (at least 20 kills; every stage is hit
//! every time: the merges and the report, a few ms each, pause before
//! their manifests, see [`PAUSES`]), resumed each time,
//! ends with every output file (prompts, images, verdicts, held-out
//! prompts, scores, the adapters' and merges' tensors, the loss logs and
//! results.json) equal byte for byte to an uninterrupted run's. A second
//! test does the same with two workers on one run directory, either of
//! which may be killed (at least 20 kills, in images, training, merges and
//! evaluation at least: prompts and the report are often over before a
//! worker's start-up ends).

use crate::support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn selma() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_selma"));
    c.env(
        "SELMA_CACHE_DIR",
        support::root().join("target/selma-test-cache"),
    );
    c
}

/// 2 skills x 6 prompts x 2 images of 32 px, 3 adapters x 24 updates
/// (checkpoint every 4), two merges, 3 held-out prompts per skill.
const CONFIG: &str = r#"
[run]
seed = 5
[models]
teacher = "$RUN/model"
init_tiny = true
[prompts]
count = 6
[[skills]]
name = "general"
[[skills]]
name = "counting"
[images]
per_prompt = 2
steps = 4
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
save_every = 4
steps = 24
[[merge]]
strategy = "linear"
[[merge]]
strategy = "ties"
[eval]
prompts = 3
grid_prompts = 1
"#;

const STAGES: [&str; 6] = ["prompts", "images", "train", "merge", "eval", "report"];

/// Kills aimed at each stage, and the longest wait (ms) after a worker's
/// start-up before its kill (for the short stages: after its start).
/// Measured on this config: plan written 9 ms after start, prompts done at
/// 14 ms, images at 0.5 s, training at 0.8 s, merges 16 ms, evaluation and
/// report 0.6 s.
const AIM: [(usize, u64); 6] = [(3, 12), (8, 150), (14, 150), (3, 30), (10, 150), (3, 40)];

/// A tiny seeded generator for the kill schedule.
struct Lcg(u64);
impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

fn config(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join("pipeline.toml");
    std::fs::write(&p, CONFIG).unwrap();
    p
}

/// Merges and the report last a few ms each: every unit of theirs pauses
/// this long before its manifest (outputs already in place), so the kills
/// aimed at them land even on a loaded machine.
const PAUSES: &str = "merge=250,report=250";

fn start(cfg: &Path, run: &Path) -> Child {
    selma()
        .env("SELMA_FAULT_PAUSE_MS", PAUSES)
        .args(["run", cfg.to_str().unwrap(), "--run-dir"])
        .arg(run)
        .arg("-q")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The first stage with a planned unit that is not done (None: all done,
/// or the run has not written its plan yet and nothing is known).
fn current_stage(run: &Path) -> Option<&'static str> {
    let plan: BTreeMap<String, Vec<String>> =
        serde_json::from_str(&std::fs::read_to_string(run.join(".selma/plan.json")).ok()?).ok()?;
    for stage in STAGES {
        let dir = run.join(".selma/manifests").join(stage);
        let mut done = BTreeSet::new();
        for e in std::fs::read_dir(&dir).into_iter().flatten() {
            let Ok(text) = std::fs::read_to_string(e.unwrap().path()) else {
                continue;
            };
            let Ok(m) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            if m["done"] == true {
                done.insert(m["unit"].as_str().unwrap_or_default().to_string());
            }
        }
        if plan
            .get(stage)
            .into_iter()
            .flatten()
            .any(|u| !done.contains(u))
        {
            return Some(stage);
        }
    }
    None
}

/// The outputs compared with the uninterrupted run, as bytes (adapters and
/// merges by their tensors: their metadata names the model's folder).
fn outputs(run: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![run.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(run).unwrap().to_string_lossy().to_string();
            if p.is_dir() {
                if !rel.starts_with(".selma") && !rel.starts_with("model") {
                    stack.push(p);
                }
                continue;
            }
            // The trainer's caches are keyed by the model folder's identity
            // (its files' times differ between the two runs): not outputs.
            if rel.contains("-cache/") {
                continue;
            }
            let keep = rel.ends_with(".png")
                || rel.ends_with("prompts.jsonl")
                || rel.ends_with("verdicts.jsonl")
                || rel.ends_with("metadata.jsonl")
                || rel.ends_with("loss.jsonl")
                || rel.starts_with("eval/scores")
                || rel == "results.json"
                || (rel.ends_with(".safetensors") && !rel.contains("checkpoint-"));
            if !keep {
                continue;
            }
            let b = std::fs::read(&p).unwrap();
            let b = if rel.ends_with(".safetensors") {
                let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
                let mut h: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
                h.as_object_mut().unwrap().remove("__metadata__");
                let mut v = h.to_string().into_bytes();
                v.extend_from_slice(&b[8 + n..]);
                v
            } else {
                b
            };
            out.insert(rel, b);
        }
    }
    out
}

fn reference(tmp: &Path, cfg: &Path) -> BTreeMap<String, Vec<u8>> {
    let run = tmp.join("reference");
    let out = start(cfg, &run).wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let o = outputs(&run);
    assert!(o.len() > 40, "{:?}", o.keys());
    o
}

fn assert_same(got: &BTreeMap<String, Vec<u8>>, want: &BTreeMap<String, Vec<u8>>) {
    let (a, b): (BTreeSet<&String>, BTreeSet<&String>) =
        (got.keys().collect(), want.keys().collect());
    assert_eq!(a, b, "a different set of output files");
    for (k, v) in want {
        assert!(&got[k] == v, "{k} differs from the uninterrupted run's");
    }
}

/// How long `selma run` takes to start working: a run with nothing to do.
fn startup(cfg: &Path, done_run: &Path) -> Duration {
    let t0 = Instant::now();
    let out = start(cfg, done_run).wait_with_output().unwrap();
    assert!(out.status.success());
    t0.elapsed()
}

/// Runs `workers` processes on one run directory and kills one of them
/// (SIGKILL) after it has worked for a random moment in the target stage,
/// [`AIM`]'s count of times per stage (fewer where a stage ends first);
/// then lets the run finish. Returns the stages the kills landed in.
fn chaos(
    cfg: &Path,
    run: &Path,
    workers: usize,
    seed: u64,
    startup: Duration,
) -> Vec<&'static str> {
    let mut rng = Lcg(seed);
    let mut procs: Vec<Option<(Child, Instant)>> = (0..workers).map(|_| None).collect();
    let mut landed = vec![];
    let (mut target, mut aimed) = (0usize, 0usize);
    let mut victim = rng.below(workers as u64) as usize;
    let mut delay = Duration::from_millis(rng.below(AIM[0].1));
    let deadline = Instant::now() + Duration::from_secs(600);
    while target < STAGES.len() {
        assert!(
            Instant::now() < deadline,
            "chaos did not finish: {landed:?}"
        );
        for p in procs.iter_mut() {
            let exited = match p {
                None => true,
                Some((c, _)) => match c.try_wait().unwrap() {
                    None => false,
                    Some(st) => {
                        assert!(st.success(), "a worker failed");
                        true
                    }
                },
            };
            if exited {
                *p = Some((start(cfg, run), Instant::now()));
            }
        }
        let now = match current_stage(run) {
            Some(s) => s,
            // Not started (no plan yet), or finished.
            None if run.join("report.html").is_file() => break,
            None => STAGES[0],
        };
        let at = STAGES.iter().position(|s| *s == now).unwrap();
        if at > target {
            (target, aimed) = (at, 0);
        }
        let (c, spawned) = procs[victim].as_mut().expect("started above");
        // Prompts, merges and the report take a few ms: their kills are
        // drawn from the worker's first moments (a restarted worker is back
        // in the stage after its done checks; before its plan is written
        // the run is, by its files, still in prompts).
        let short = matches!(target, 0 | 3 | 5);
        let after = if short { delay } else { startup + delay };
        if at < target || spawned.elapsed() < after {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        if c.try_wait().unwrap().is_none() {
            c.kill().unwrap();
            c.wait().unwrap();
            landed.push(now);
            procs[victim] = None;
            aimed += 1;
        }
        if aimed >= AIM[target].0 {
            (target, aimed) = (target + 1, 0);
        }
        victim = rng.below(workers as u64) as usize;
        delay = Duration::from_millis(rng.below(AIM[target.min(5)].1));
    }
    // Let everything finish: the live workers, then one clean pass.
    for (c, _) in procs.into_iter().flatten() {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = start(cfg, run).wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    landed
}

/// Prints where the kills landed; returns the count per stage.
fn report<'a>(what: &str, landed: &[&'a str]) -> BTreeMap<&'a str, usize> {
    let mut by: BTreeMap<&str, usize> = BTreeMap::new();
    for s in landed {
        *by.entry(s).or_default() += 1;
    }
    eprintln!("{what}: {} SIGKILLs landed, by stage: {by:?}", landed.len());
    by
}

#[test]
fn sigkill_in_every_stage_then_resume_gives_the_uninterrupted_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let want = reference(tmp.path(), &cfg);
    let startup = startup(&cfg, &tmp.path().join("reference"));
    let run = tmp.path().join("chaos");
    let landed = chaos(&cfg, &run, 1, 20261203, startup);
    let by = report("one worker", &landed);
    assert!(landed.len() >= 20, "{landed:?}");
    for s in &STAGES {
        assert!(by.contains_key(s), "no kill landed in {s}: {by:?}");
    }
    assert_same(&outputs(&run), &want);
}

#[test]
fn two_workers_killed_at_random_give_the_uninterrupted_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let want = reference(tmp.path(), &cfg);
    let startup = startup(&cfg, &tmp.path().join("reference"));
    let run = tmp.path().join("chaos");
    let landed = chaos(&cfg, &run, 2, 77, startup);
    let by = report("two workers", &landed);
    assert!(landed.len() >= 20, "{landed:?}");
    for s in ["images", "train", "merge", "eval"] {
        assert!(by.contains_key(s), "no kill landed in {s}: {by:?}");
    }
    assert_same(&outputs(&run), &want);
}
