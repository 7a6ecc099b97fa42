//! A run directory written by the selma of commit 26098c8 (before the
//! pipeline's units went through one driver; tests/fixtures/run-before-house,
//! made with its config by that commit's binary, minus the model weights and
//! training checkpoints) resumes under this selma redoing exactly the units
//! a deliberate change of outputs touched, and no others.
//!
//! The deliberate change: ShapeWorld's scene sampler draws its bounded
//! numbers with selma-rng's one `below` (it used multiply-shift), so a
//! ShapeWorld replay pool holds other scenes; its identity carries a
//! `sampler` salt, so every adapter trained with `[train.replay]` is redone,
//! and with it what depends on the adapters (merges, their scores, the
//! report; results.json only where a score changed). Prompts, images, verdicts, held-out prompts and the base
//! model's scores are kept, byte for byte, and a fresh run of this selma
//! writes them identically (and everything else as the resumed run did).
//!
//! The fixture's config covers every shape of unit name: a tagged seed
//! (`@seed3`), the filter ablation (`/unfiltered`), the joint adapter, a
//! merge and a `[train.replay]` ShapeWorld pool.

use crate::support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

fn fixture() -> PathBuf {
    support::root().join("tests/fixtures/run-before-house")
}

fn selma() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_selma"));
    c.env(
        "SELMA_CACHE_DIR",
        support::root().join("target/selma-test-cache"),
    );
    c
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).unwrap();
        }
    }
}

/// The tiny model the fixture's run used, recreated (it is deterministic in
/// its seed) with the modification times the old run saw, which the model
/// identity includes.
fn recreate_model(run: &Path) {
    let model = run.join("model");
    selma_diffusion::init::init_model_with_vocabulary(
        selma_diffusion::init::Preset::Tiny,
        &model,
        0,
        &selma_shapeworld::caption::VOCABULARY,
    )
    .unwrap();
    let text = std::fs::read_to_string(fixture().join("model-mtimes.json")).unwrap();
    let times: std::collections::BTreeMap<String, u64> = serde_json::from_str(&text).unwrap();
    for (rel, ns) in times {
        let f = std::fs::File::options()
            .write(true)
            .open(model.join(&rel))
            .unwrap_or_else(|e| panic!("the recreated model lacks {rel}: {e}"));
        f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_nanos(ns))
            .unwrap();
    }
}

fn run(config: &Path, run_dir: &Path) -> Output {
    let out = selma()
        .args(["run", config.to_str().unwrap(), "--run-dir"])
        .arg(run_dir)
        .arg("-q")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "selma run failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The units an invocation ran, from its "ran N unit(s) in ...: a, b" line.
fn ran_units(o: &Output) -> BTreeSet<String> {
    let e = String::from_utf8_lossy(&o.stderr).to_string();
    e.lines()
        .find(|l| l.starts_with("ran "))
        .and_then(|l| l.split_once(": "))
        .map(|(_, list)| list.split(", ").map(|s| s.to_string()).collect())
        .unwrap_or_default()
}

/// Files under `dir` (relative paths), recursively.
fn files(dir: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out
}

/// A safetensors file's tensors: its header without `__metadata__` (which
/// names the model folder) and its data bytes.
fn tensors(path: &Path) -> (serde_json::Value, Vec<u8>) {
    let b = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    header.as_object_mut().unwrap().remove("__metadata__");
    (header, b[8 + n..].to_vec())
}

/// Every unit output that must not depend on where or by which selma the
/// run was made, as comparable bytes (report.html and loss logs name paths
/// and times; they are left out).
fn outputs(run: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v = vec![];
    for f in files(run) {
        let name = f.to_string_lossy().to_string();
        let keep = name.ends_with(".png")
            || name.ends_with("prompts.jsonl")
            || name.ends_with("verdicts.jsonl")
            || name.starts_with("eval/")
            || name == "results.json"
            || (name.ends_with(".safetensors") && !name.contains(".run/"));
        // The replay pool is rendered input, not a unit's output (the
        // adapters trained on it are compared).
        if !keep || name.contains("/.selma-input") || name.starts_with("replay/") {
            continue;
        }
        let bytes = if name.ends_with(".safetensors") {
            let (h, d) = tensors(&run.join(&f));
            let mut b = h.to_string().into_bytes();
            b.extend(d);
            b
        } else {
            std::fs::read(run.join(&f)).unwrap()
        };
        v.push((f, bytes));
    }
    v
}

/// Whether an output belongs to a unit the sampler change does not touch.
fn untouched(rel: &Path) -> bool {
    let name = rel.to_string_lossy();
    !(name.starts_with("experts/")
        || name.starts_with("merged/")
        || name == "results.json"
        || (name.starts_with("eval/")
            && !name.starts_with("eval/prompts")
            && !name.contains("base-seed3")))
}

/// The units the sampler change redoes.
fn redone() -> BTreeSet<String> {
    let mut want = BTreeSet::new();
    for t in ["", "/unfiltered"] {
        for a in ["expert:general", "expert:counting", "joint"] {
            want.insert(format!("{a}{t}@seed3"));
        }
        want.insert(format!("merged:linear{t}@seed3"));
        for v in [
            "expert:general",
            "expert:counting",
            "joint",
            "merged:linear",
        ] {
            for s in ["general", "counting"] {
                want.insert(format!("scores:{v}{t}@seed3:{s}"));
            }
        }
    }
    // Not `results`: its inputs are the score files' hashes, and the
    // degenerate scorer gives the tiny model's noise 1.0 whatever the
    // adapter, so the redone scores are byte for byte the old ones. The
    // report reads the loss logs, which changed.
    want.insert("report".into());
    want
}

#[test]
fn a_run_directory_of_the_previous_layout_redoes_exactly_what_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    copy_dir(&fixture().join("run"), &run_dir);
    recreate_model(&run_dir);
    let config = fixture().join("pipeline.toml");
    let before = outputs(&run_dir);
    assert!(before.len() > 60, "the fixture holds every unit's files");

    let out = run(&config, &run_dir);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(ran_units(&out), redone(), "{err}");
    let after = outputs(&run_dir);
    let kept = |v: &[(PathBuf, Vec<u8>)]| -> Vec<(PathBuf, Vec<u8>)> {
        v.iter().filter(|(p, _)| untouched(p)).cloned().collect()
    };
    assert!(kept(&before).len() > 30);
    assert_eq!(
        kept(&after),
        kept(&before),
        "an untouched unit's output changed"
    );
    // Then everything is done.
    let again = run(&config, &run_dir);
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("nothing to do"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    // A fresh run of this selma writes what the resumed run holds.
    let fresh = tmp.path().join("fresh");
    run(&config, &fresh);
    let now = outputs(&fresh);
    let names = |v: &[(PathBuf, Vec<u8>)]| v.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>();
    assert_eq!(names(&now), names(&after), "a different set of outputs");
    for ((p, a), (_, b)) in now.iter().zip(&after) {
        assert!(
            a == b,
            "{} differs between the fresh and the resumed run",
            p.display()
        );
    }
}
