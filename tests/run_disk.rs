//! A full disk: `selma run` on a small config whose crash-safe writes hit
//! ENOSPC after a budget of bytes (`SELMA_TEST_DISK_BYTES`, the writers'
//! test hook), for budgets that run out in different stages. Each time the
//! run stops with an error naming the file it could not write and the
//! cause, no file under a final name is partial (every JSON, PNG and
//! safetensors file parses), and a re-run with space finishes with the
//! outputs of a run that never ran out.

use crate::support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn selma() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_selma"));
    c.env(
        "SELMA_CACHE_DIR",
        support::root().join("target/selma-test-cache"),
    );
    c
}

/// 2 skills x 3 prompts x 2 images of 32 px, 12 updates per adapter.
const CONFIG: &str = r#"
[run]
seed = 9
[models]
teacher = "$RUN/model"
init_tiny = true
[prompts]
count = 3
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
save_every = 4
steps = 12
[[merge]]
strategy = "linear"
[eval]
prompts = 2
grid_prompts = 1
"#;

fn run(cfg: &Path, dir: &Path, disk: Option<u64>) -> Output {
    let mut c = selma();
    c.args(["run", cfg.to_str().unwrap(), "--run-dir"])
        .arg(dir)
        .arg("-q");
    if let Some(n) = disk {
        c.env("SELMA_TEST_DISK_BYTES", n.to_string());
    }
    c.output().unwrap()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
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
    out.sort();
    out
}

/// Every file under a final name parses as what its extension says.
fn assert_whole(run: &Path) {
    for p in walk(run) {
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name.contains(".tmp-") || p.strip_prefix(run).unwrap().starts_with("model") {
            continue;
        }
        let b = std::fs::read(&p).unwrap();
        let ok = match p.extension().and_then(|e| e.to_str()) {
            Some("json") => serde_json::from_slice::<serde_json::Value>(&b).is_ok(),
            Some("jsonl") => std::str::from_utf8(&b).is_ok_and(|t| {
                t.lines()
                    .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
            }),
            Some("png") => selma_diffusion::image_io::read_png(&p).is_ok(),
            Some("safetensors") => safetensors::SafeTensors::deserialize(&b).is_ok(),
            _ => true,
        };
        assert!(ok, "{} is partial after the disk filled up", p.display());
    }
}

/// The outputs compared with the run that had space (adapters by tensors).
fn outputs(run: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for p in walk(run) {
        let rel = p.strip_prefix(run).unwrap().to_string_lossy().to_string();
        let keep = rel.ends_with(".png")
            || rel.ends_with("prompts.jsonl")
            || rel.ends_with("verdicts.jsonl")
            || rel.ends_with("loss.jsonl")
            || rel.starts_with("eval/scores")
            || rel == "results.json"
            || (rel.ends_with(".safetensors") && !rel.contains(".run/"));
        if !keep || rel.starts_with("model") {
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
    out
}

#[test]
fn a_full_disk_stops_the_run_cleanly_and_a_rerun_with_space_finishes() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("pipeline.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let reference = tmp.path().join("reference");
    let out = run(&cfg, &reference, None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = outputs(&reference);
    // Bytes the run writes through its crash-safe writers: the budgets
    // below run out early, in the middle and near the end.
    // (the model, the trainer's checkpoints and caches are written
    // otherwise and left out of the count.)
    let total: u64 = walk(&reference)
        .iter()
        .filter(|p| {
            let rel = p
                .strip_prefix(&reference)
                .unwrap()
                .to_string_lossy()
                .to_string();
            !rel.starts_with("model") && !rel.contains(".run/")
        })
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    let mut stopped_in = vec![];
    for share in [0.05, 0.3, 0.6, 0.9] {
        let budget = (total as f64 * share) as u64;
        let dir = tmp.path().join(format!("full-{budget}"));
        let out = run(&cfg, &dir, Some(budget));
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            !out.status.success(),
            "budget {budget}: the run did not fail"
        );
        assert!(
            err.contains("No space left on device"),
            "budget {budget}: the error does not say the disk is full:\n{err}"
        );
        let named = err
            .lines()
            .find(|l| l.contains("cannot write "))
            .unwrap_or_else(|| panic!("budget {budget}: no path named:\n{err}"));
        assert!(named.contains(&*dir.to_string_lossy()), "{named}");
        stopped_in.push(named.trim().to_string());
        assert_whole(&dir);
        let again = run(&cfg, &dir, None);
        assert!(
            again.status.success(),
            "budget {budget}: the re-run failed:\n{}",
            String::from_utf8_lossy(&again.stderr)
        );
        let got = outputs(&dir);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "budget {budget}"
        );
        for (k, v) in &want {
            assert!(&got[k] == v, "budget {budget}: {k} differs");
        }
    }
    eprintln!(
        "full disk, where each run stopped:\n  {}",
        stopped_in.join("\n  ")
    );
}
