//! End-to-end tests of `selma run` and `selma status` (the real binary on a
//! configuration smaller than examples/tiny.toml): a full run then a re-run
//! that does nothing; a change that redoes only what depends on it; SIGKILL
//! during image generation and during training, then resume, giving the
//! same merged LoRA and results as an uninterrupted run; two shards then a
//! plain run giving the same result; bad configs failing before any work.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

fn selma() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_selma"));
    c.env(
        "SELMA_CACHE_DIR",
        support::root().join("target/selma-test-cache"),
    );
    c
}

/// A small run: 2 skills x 4 prompts x 2 images of 32 px, 16 updates per
/// expert (checkpoint every 4), 2 held-out prompts per skill.
fn small_config(extra_train: &str) -> String {
    format!(
        r#"
[run]
seed = 7
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
save_every = 4
{extra_train}
[[merge]]
strategy = "linear"
[eval]
prompts = 2
grid_prompts = 1
"#
    )
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join("pipeline.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn run_ok(args: &[&str]) -> Output {
    let out = selma().args(args).arg("-q").output().unwrap();
    assert!(
        out.status.success(),
        "selma {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// The units an invocation ran, from its "ran N unit(s) in ...: a, b" line.
fn ran_units(o: &Output) -> Vec<String> {
    let e = stderr(o);
    e.lines()
        .find(|l| l.starts_with("ran "))
        .and_then(|l| l.split_once(": "))
        .map(|(_, list)| list.split(", ").map(|s| s.to_string()).collect())
        .unwrap_or_default()
}

fn mtime(p: &Path) -> SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

fn png_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().to_string();
            n.ends_with(".png") && !n.starts_with('.')
        })
        .collect();
    v.sort();
    v
}

/// An uninterrupted, unsharded run of the small config (made once per process).
fn reference() -> &'static PathBuf {
    static REF: OnceLock<PathBuf> = OnceLock::new();
    REF.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let cfg = write_config(&dir, &small_config("steps = 16"));
        let run = dir.join("run");
        run_ok(&[
            "run",
            cfg.to_str().unwrap(),
            "--run-dir",
            run.to_str().unwrap(),
        ]);
        run
    })
}

/// A safetensors file as (header as JSON, data bytes): the header's key
/// order is not significant (the writer serialises a hash map).
fn safetensors_parts(path: &Path) -> (serde_json::Value, Vec<u8>) {
    let b = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    (header, b[8 + n..].to_vec())
}

/// The final products that must not depend on how the run was carried out:
/// the merged LoRA (every tensor bit for bit, same metadata) and results.json.
fn assert_same_products(a: &Path, b: &Path) {
    let (ha, da) = safetensors_parts(&a.join("merged/linear.safetensors"));
    let (hb, db) = safetensors_parts(&b.join("merged/linear.safetensors"));
    assert_eq!(ha, hb, "merged LoRA headers differ");
    assert!(
        da == db,
        "merged LoRA tensors differ between {} and {}",
        a.display(),
        b.display()
    );
    let x = std::fs::read_to_string(a.join("results.json")).unwrap();
    let y = std::fs::read_to_string(b.join("results.json")).unwrap();
    assert_eq!(x, y, "results.json differs");
}

#[test]
fn end_to_end_then_nothing_to_do_then_only_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    // CLIPScore from a small random CLIP folder, beside the image-filter scorer.
    selma::eval::clip::init_tiny_clip(&dir.path().join("clip"), 0).unwrap();
    let with_clip = |c: String| c.replace("[eval]\n", "[eval]\nclip_model = \"clip\"\n");
    let cfg = write_config(dir.path(), &with_clip(small_config("steps = 8")));
    let run = dir.path().join("run");
    let args = [
        "run",
        cfg.to_str().unwrap(),
        "--run-dir",
        run.to_str().unwrap(),
    ];
    let first = run_ok(&args);
    let stdout = String::from_utf8_lossy(&first.stdout).to_string();
    assert!(
        stdout.contains("report: ") && stdout.contains("report.html"),
        "the run must end by printing the report's path: {stdout}"
    );
    // The layout of the issue.
    for skill in ["general", "counting"] {
        let prompts = std::fs::read_to_string(run.join(skill).join("prompts.jsonl")).unwrap();
        assert_eq!(prompts.lines().count(), 4, "{skill}: 4 prompts");
        assert_eq!(
            png_files(&run.join(skill).join("images")).len(),
            8,
            "{skill}: 4 x 2 images"
        );
        let meta = std::fs::read_to_string(run.join(skill).join("images/metadata.jsonl")).unwrap();
        let kept = meta.lines().count();
        assert!((1..=8).contains(&kept));
        assert!(run
            .join("experts")
            .join(format!("{skill}.safetensors"))
            .is_file());
        let losses =
            std::fs::read_to_string(run.join(format!("experts/{skill}.run/loss.jsonl"))).unwrap();
        assert_eq!(losses.lines().count(), 8, "one loss line per update");
    }
    assert!(run.join("experts/joint.safetensors").is_file());
    assert!(run.join("merged/linear.safetensors").is_file());
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("results.json")).unwrap()).unwrap();
    let variants: Vec<&str> = results["variants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        variants,
        [
            "base",
            "expert:general",
            "expert:counting",
            "joint",
            "merged:linear"
        ]
    );
    // An image filter gives two columns: its accuracy (pass = 1) and its score.
    assert_eq!(
        results["scorers"],
        serde_json::json!(["degenerate accuracy", "degenerate", "clipscore"])
    );
    // Every variant x skill x scorer, each over the 2 held-out prompts.
    let cells = results["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 5 * 2 * 3);
    assert!(cells.iter().all(|c| c["n"] == 2));
    for c in cells {
        let (m, lo, hi) = (
            c["mean"].as_f64().unwrap(),
            c["lo"].as_f64().unwrap(),
            c["hi"].as_f64().unwrap(),
        );
        assert!(lo <= m && m <= hi, "{c}");
        if c["scorer"] == "clipscore" {
            assert!((0.0..=100.0).contains(&m), "{c}");
        } else {
            assert!((0.0..=1.0).contains(&m), "{c}");
        }
    }
    // The report embeds every image it shows (no external references).
    let html = std::fs::read_to_string(run.join("report.html")).unwrap();
    assert!(html.contains("data:image/png;base64,"));
    assert!(!html.contains("src=\"eval/"));
    // ... and a real browser shows the table and every one of them (must-show 5
    // on the pipeline's own page, beside tests/report.rs).
    let dom = support::browser::dump_dom(&run.join("report.html"));
    let total = support::browser::body_attr(&dom, "data-images-total").unwrap_or(0);
    let loaded = support::browser::body_attr(&dom, "data-images-loaded").unwrap_or(0);
    assert!(
        total > 0 && loaded == total,
        "{loaded} of {total} images loaded"
    );
    assert!(
        dom.contains("<table"),
        "no results table in the rendered page"
    );
    for variant in ["base", "joint", "merged:linear"] {
        assert!(
            dom.contains(variant),
            "the rendered page lacks the {variant} row"
        );
    }
    for r in support::browser::references(&dom) {
        assert!(
            r.starts_with("data:") || r.starts_with('#') || r.is_empty(),
            "the page references {r}"
        );
    }
    // Held-out prompts are not training prompts.
    for skill in ["general", "counting"] {
        let train = std::fs::read_to_string(run.join(skill).join("prompts.jsonl")).unwrap();
        let held =
            std::fs::read_to_string(run.join(format!("eval/prompts/{skill}.jsonl"))).unwrap();
        for l in held.lines() {
            let t: serde_json::Value = serde_json::from_str(l).unwrap();
            let needle = serde_json::to_string(&t["text"]).unwrap();
            assert!(
                !train.contains(&needle),
                "held-out prompt {needle} is a training prompt"
            );
        }
    }
    let status = selma()
        .args(["status", run.to_str().unwrap()])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout).to_string();
    for stage in ["prompts", "images", "train", "merge", "eval", "report"] {
        let line = status.lines().find(|l| l.starts_with(stage)).unwrap();
        assert!(line.contains("done"), "{status}");
    }
    assert!(status.contains("prompts 8"), "{status}");

    // Second invocation: nothing runs, nothing is rewritten.
    let watched = [
        run.join("results.json"),
        run.join("report.html"),
        run.join("merged/linear.safetensors"),
        run.join("experts/general.safetensors"),
        run.join("general/images/00000-0.png"),
        run.join("pipeline.toml"),
        run.join(".selma/plan.json"),
    ];
    let before: Vec<SystemTime> = watched.iter().map(|p| mtime(p)).collect();
    let t0 = Instant::now();
    let second = run_ok(&args);
    assert!(
        stderr(&second).contains("nothing to do"),
        "{}",
        stderr(&second)
    );
    assert!(ran_units(&second).is_empty());
    assert!(t0.elapsed() < Duration::from_secs(20));
    let after: Vec<SystemTime> = watched.iter().map(|p| mtime(p)).collect();
    assert_eq!(before, after);

    // A training change redoes training and what depends on it, nothing upstream.
    write_config(dir.path(), &with_clip(small_config("steps = 6")));
    let third = run_ok(&args);
    let ran = ran_units(&third);
    assert!(ran.contains(&"expert:general".to_string()), "{ran:?}");
    assert!(ran.contains(&"joint".to_string()), "{ran:?}");
    assert!(ran.contains(&"merged:linear".to_string()), "{ran:?}");
    assert!(
        !ran.iter().any(|u| u.starts_with("prompts:")
            || u.starts_with("images:")
            || u.starts_with("filter:")
            || u.starts_with("eval-prompts:")
            || u.starts_with("scores:base:")),
        "{ran:?}"
    );
    assert_eq!(mtime(&run.join("general/images/00000-0.png")), before[4]);

    // --force eval with --stages eval,report: evaluation redone from scratch,
    // nothing upstream, and the same numbers (fixed seeds).
    let results_before = std::fs::read_to_string(run.join("results.json")).unwrap();
    let forced: Vec<&str> = args
        .iter()
        .copied()
        .chain(["--force", "eval", "--stages", "eval,report"])
        .collect();
    let fourth = run_ok(&forced);
    let ran = ran_units(&fourth);
    assert!(ran.contains(&"scores:base:general".to_string()), "{ran:?}");
    assert!(ran.contains(&"results".to_string()), "{ran:?}");
    assert!(
        !ran.iter()
            .any(|u| u.starts_with("expert:") || u.starts_with("merged:")),
        "{ran:?}"
    );
    assert_eq!(
        std::fs::read_to_string(run.join("results.json")).unwrap(),
        results_before
    );
}

/// Spawn a run and SIGKILL it as soon as `ready` holds; returns whether it
/// was killed (false: it finished first).
fn kill_when(args: &[&str], ready: impl Fn() -> bool) -> bool {
    let mut child = selma()
        .args(args)
        .arg("-q")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        if ready() {
            // Child::kill sends SIGKILL on Unix.
            child.kill().unwrap();
            child.wait().unwrap();
            return true;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("the run ended ({st}) before the kill point");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "kill point never reached"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn sigkill_during_images_and_training_then_resume_gives_the_same_result() {
    let reference = reference();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &small_config("steps = 16"));
    let run = dir.path().join("run");
    let args = [
        "run",
        cfg.to_str().unwrap(),
        "--run-dir",
        run.to_str().unwrap(),
    ];

    // Kill during image generation: after the first image file appears.
    let images = run.join("general/images");
    assert!(kill_when(&args, || !png_files(&images).is_empty()));
    let rendered = png_files(&images).len() + png_files(&run.join("counting/images")).len();
    assert!(
        rendered < 16,
        "killed during images: {rendered} of 16 rendered"
    );

    // Kill during training: after the first checkpoint of the first expert.
    let ckpt = run.join("experts/general.run/checkpoint-4");
    assert!(kill_when(&args, || ckpt.is_dir()));
    assert!(
        !run.join("experts/general.safetensors").exists(),
        "killed before the first expert was finished"
    );

    // Resume to the end.
    let out = run_ok(&args);
    let e = stderr(&out);
    assert!(e.contains("expert:general: resuming from step"), "{e}");
    let ran = ran_units(&out);
    assert!(!ran.contains(&"prompts:general".to_string()), "{ran:?}");
    assert_same_products(reference, &run);
    // The resumed expert's loss log has each update once, as uninterrupted.
    let log = |r: &Path| std::fs::read_to_string(r.join("experts/general.run/loss.jsonl")).unwrap();
    assert_eq!(log(reference), log(&run));
}

#[test]
fn two_shards_then_a_plain_run_equal_an_unsharded_run() {
    let reference = reference();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &small_config("steps = 16"));
    let run = dir.path().join("run");
    let base = [
        "run",
        cfg.to_str().unwrap(),
        "--run-dir",
        run.to_str().unwrap(),
    ];
    let with = |extra: &[&'static str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let args0 = with(&["--shard", "0/2"]);
    let s0 = run_ok(&args0.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    // Shard 0 renders prompts 0, 2 of general and 0, 2 of counting (global 4, 6).
    let n0 = png_files(&run.join("general/images")).len();
    let n0c = png_files(&run.join("counting/images")).len();
    assert_eq!((n0, n0c), (4, 4));
    assert!(!run.join("merged").exists());
    assert!(stderr(&s0).contains("left for a later run"));
    let st = selma()
        .args(["status", run.to_str().unwrap()])
        .output()
        .unwrap();
    let st = String::from_utf8_lossy(&st.stdout).to_string();
    let images_line = st.lines().find(|l| l.starts_with("images")).unwrap();
    assert!(
        images_line.contains("part 0/4") && images_line.contains("2 in progress"),
        "{st}"
    );
    assert!(
        st.lines().any(|l| l.starts_with("prompts  done 2/2")),
        "{st}"
    );
    let args1 = with(&["--shard", "1/2"]);
    let s1 = run_ok(&args1.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    let ran1 = ran_units(&s1);
    // Shard 1 completes the images and trains its share of the experts:
    // units [general, counting, joint] -> shard 1 owns counting.
    assert!(ran1.contains(&"expert:counting".to_string()), "{ran1:?}");
    assert!(!ran1.contains(&"expert:general".to_string()), "{ran1:?}");
    assert!(!run.join("merged").exists());
    let stamps: Vec<SystemTime> = png_files(&run.join("general/images"))
        .iter()
        .map(|p| mtime(p))
        .collect();
    assert_eq!(stamps.len(), 8);

    let plain = run_ok(&base);
    let ran = ran_units(&plain);
    assert!(ran.contains(&"expert:general".to_string()), "{ran:?}");
    assert!(ran.contains(&"joint".to_string()), "{ran:?}");
    assert!(!ran.contains(&"expert:counting".to_string()), "{ran:?}");
    assert!(!ran.iter().any(|u| u.starts_with("images:")), "{ran:?}");
    let again: Vec<SystemTime> = png_files(&run.join("general/images"))
        .iter()
        .map(|p| mtime(p))
        .collect();
    assert_eq!(stamps, again, "the plain run re-rendered images");
    assert_same_products(reference, &run);
}

/// Run with a bad config: it must fail within seconds, name `needles`, and
/// leave no run directory behind.
fn bad(name: &str, config: &str, needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), config);
    std::fs::write(dir.path().join("core.wasm"), b"\0asm\x01\0\0\0").unwrap();
    std::fs::write(dir.path().join("junk.wasm"), b"not wasm at all").unwrap();
    let run = dir.path().join("run");
    let t0 = Instant::now();
    let out = selma()
        .args([
            "run",
            cfg.to_str().unwrap(),
            "--run-dir",
            run.to_str().unwrap(),
            "-q",
        ])
        .output()
        .unwrap();
    let e = stderr(&out);
    assert!(!out.status.success(), "{name}: must fail");
    for n in needles {
        assert!(e.contains(n), "{name}: message lacks {n:?}:\n{e}");
    }
    assert!(t0.elapsed() < Duration::from_secs(30), "{name}: not fast");
    assert!(
        !run.exists(),
        "{name}: work started before validation failed"
    );
}

#[test]
fn bad_pipeline_toml_fails_fast_naming_problem_and_place() {
    let ok =
        "[models]\nteacher = \"$RUN/model\"\ninit_tiny = true\n[[skills]]\nname = \"general\"\n";
    let cfg = |extra: &str| format!("{ok}{extra}");
    bad(
        "unknown key",
        &cfg("[images]\nsteps = 3\nstepz = 3\n"),
        &["pipeline.toml:8", "stepz"],
    );
    bad(
        "wrong type",
        &cfg("[train]\nsteps = \"many\"\n"),
        &["pipeline.toml:7", "steps"],
    );
    bad(
        "missing model folder",
        "[models]\nteacher = \"no-such-model\"\n[[skills]]\nname = \"general\"\n",
        &[
            "pipeline.toml:2",
            "models.teacher",
            "no-such-model",
            "does not exist",
        ],
    );
    bad(
        "not a diffusers folder",
        "[models]\nteacher = \".\"\n[[skills]]\nname = \"general\"\n",
        &["pipeline.toml:2", "models.teacher", "model_index.json"],
    );
    bad(
        "core module instead of a component",
        "[models]\nteacher = \"$RUN/model\"\ninit_tiny = true\n[[skills]]\nname = \"general\"\n[[skills]]\nname = \"core.wasm\"\n",
        &["pipeline.toml:7", "skills[1].name", "core.wasm", "component"],
    );
    bad(
        "junk plugin file",
        &cfg("[images]\nfilters = [\"junk.wasm\"]\n"),
        &["pipeline.toml:7", "images.filters[0]", "junk.wasm"],
    );
    bad(
        "plugin of the wrong kind",
        &cfg("[[merge]]\nstrategy = \"rouge-l\"\n"),
        &[
            "pipeline.toml:7",
            "merge[0].strategy",
            "prompt-filter",
            "merge-strategy",
        ],
    );
    bad(
        "unknown plugin parameter",
        &cfg("[params.rouge-l]\nthresh = 0.5\n"),
        &["pipeline.toml:6", "rouge-l", "thresh", "threshold"],
    );
    bad(
        "unknown trainer setting",
        &cfg("[train.extra]\nema_decai = 0.9\n"),
        &["pipeline.toml:6", "train.extra", "ema_decai"],
    );
    bad(
        "bad value",
        &cfg("[images]\nwidth = 30\n"),
        &["pipeline.toml:6", "images.width", "multiple of 8"],
    );
    bad(
        "unknown scheduler",
        &cfg("[images]\nscheduler = \"fast\"\n"),
        &["pipeline.toml:7", "images.scheduler", "fast"],
    );
    bad(
        "replay share",
        &cfg("[train.replay]\nshare = 1.5\nshapeworld = 10\n"),
        &["pipeline.toml:6", "train.replay.share", "(0, 1)"],
    );
    bad(
        "replay pool",
        &cfg("[train.replay]\nshare = 0.3\n"),
        &["pipeline.toml:6", "[train.replay]", "data", "shapeworld"],
    );
    bad(
        "replay folder",
        &cfg("[train.replay]\nshare = 0.3\ndata = \"nowhere\"\n"),
        &[
            "pipeline.toml:6",
            "train.replay.data",
            "nowhere",
            "metadata.jsonl",
        ],
    );
}

#[test]
fn default_config_prints_and_is_the_shipped_example() {
    let out = run_ok(&["run", "--print-default-config"]);
    let text = String::from_utf8(out.stdout).unwrap();
    let shipped = std::fs::read_to_string(support::root().join("examples/tiny.toml")).unwrap();
    assert_eq!(text, shipped);
    let v: toml::Table = toml::from_str(&text).unwrap();
    assert_eq!(v["skills"].as_array().unwrap().len(), 5);
    // The real-use example parses and names an LLM endpoint.
    let sd15 = std::fs::read_to_string(support::root().join("examples/sd15.toml")).unwrap();
    let v: toml::Table = toml::from_str(&sd15).unwrap();
    assert!(v["llm"]["endpoint"].as_str().is_some());
}
