//! End-to-end test of SELMA's ablation on ShapeWorld through the real
//! `selma run` binary (issue 6, must-show 3): the random ShapeWorld model is
//! made on the fly; 2 sw skills, few prompts, few steps, 2 seeds, the
//! verifier as image filter and scorer, the image-filter ablation on, merges
//! linear + ties. Checks the structure and invariants of the ablation table
//! in results.json (every variant incl. `/unfiltered`, intervals contain the
//! means, pass rates in [0,1], counts add up), the per-seed breakdown, the
//! table on stdout, report.html; and that examples/shapeworld.toml validates.

use crate::support::{self, ok, selma};

const SKILLS: [&str; 2] = ["sw-counting", "sw-single"];
const SEEDS: [u64; 2] = [3, 5];
const PROMPTS: usize = 3;
const PER_PROMPT: usize = 2;

/// The ablation config: small enough for CI on 2 cores. The random model
/// draws no verifiable scene, so the training images are filtered by
/// `degenerate` with a brightness threshold `min_mean` the test picks from
/// the rendered images (the verifier scores the evaluation).
fn config(min_mean: f64) -> String {
    format!(
        r#"
[run]
seed = 1
seeds = [{s0}, {s1}]
title = "ShapeWorld ablation (test)"
[models]
teacher = "$RUN/model"
init_preset = "shapeworld"
[prompts]
generator = "template"
filters = []
count = {PROMPTS}
[[skills]]
name = "{k0}"
[[skills]]
name = "{k1}"
eval_per_prompt = 2
[images]
per_prompt = {PER_PROMPT}
steps = 2
guidance = 1.5
filters = ["degenerate"]
ablate_filters = true
[train]
rank = 2
alpha = 2.0
targets = ["to_q", "to_k", "to_v", "to_out.0"]
steps = 2
batch = 2
lr = 1e-4
resolution = 32
random_flip = false
save_every = 2
[train.replay]
share = 0.25
shapeworld = 40
[[merge]]
strategy = "linear"
[[merge]]
strategy = "ties"
[eval]
prompts = 2
seed = 99
scorers = ["shapeworld-verifier"]
grid_prompts = 1
[params.degenerate]
min-mean = {min_mean}
"#,
        s0 = SEEDS[0],
        s1 = SEEDS[1],
        k0 = SKILLS[0],
        k1 = SKILLS[1],
    )
}

fn parse_pct(s: &str) -> f64 {
    s.trim_end_matches('%').parse::<f64>().unwrap() / 100.0
}

fn parse_ci(s: &str) -> (f64, f64, f64) {
    // "0.500 [0.250, 0.750]"
    let (m, rest) = s.split_once(" [").unwrap();
    let (lo, hi) = rest.trim_end_matches(']').split_once(", ").unwrap();
    (m.parse().unwrap(), lo.parse().unwrap(), hi.parse().unwrap())
}

#[test]
fn shapeworld_ablation_run_writes_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("pipeline.toml");
    std::fs::write(&cfg, config(4.0)).unwrap();
    let run_dir = dir.path().join("run");
    // Render first; then pick a brightness threshold that drops the darkest
    // image(s), so that filtered and unfiltered data differ.
    ok(selma()
        .arg("run")
        .arg(&cfg)
        .arg("--run-dir")
        .arg(&run_dir)
        .args(["--stages", "prompts,images"])
        .output()
        .unwrap());
    let mut bright: Vec<(String, f64)> = vec![];
    for k in SKILLS {
        for e in std::fs::read_dir(run_dir.join(k).join("images")).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "png") {
                let img = selma_diffusion::image_io::read_png(&p).unwrap();
                let m = img.rgb.iter().map(|&b| b as f64).sum::<f64>() / img.rgb.len() as f64;
                bright.push((k.to_string(), m));
            }
        }
    }
    assert_eq!(bright.len(), SKILLS.len() * PROMPTS * PER_PROMPT);
    let mut vals: Vec<f64> = bright.iter().map(|b| b.1).collect();
    vals.sort_by(f64::total_cmp);
    vals.dedup();
    assert!(
        vals.len() >= 2,
        "random images of equal brightness: {vals:?}"
    );
    let threshold = (vals[0] + vals[1]) / 2.0;
    std::fs::write(&cfg, config(threshold)).unwrap();
    let out = ok(selma()
        .arg("run")
        .arg(&cfg)
        .arg("--run-dir")
        .arg(&run_dir)
        .output()
        .unwrap());
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    // The table, then the report's path, on stdout.
    let t = stdout
        .find("Ablation (shapeworld-verifier)")
        .expect(&stdout);
    let r = stdout.find("report: ").expect(&stdout);
    assert!(t < r, "the table comes before the report path: {stdout}");
    assert!(stdout.contains("merged:ties/unfiltered"), "{stdout}");
    assert!(run_dir.join("report.html").is_file());
    assert!(run_dir.join("model/model_index.json").is_file());

    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("results.json")).unwrap())
            .unwrap();
    // Every seed-aggregated variant, filtered and unfiltered, base once.
    let mut want = vec!["base".to_string()];
    for suffix in ["", "/unfiltered"] {
        for k in SKILLS {
            want.push(format!("expert:{k}{suffix}"));
        }
        want.push(format!("joint{suffix}"));
        want.push(format!("merged:linear{suffix}"));
        want.push(format!("merged:ties{suffix}"));
    }
    let variants: Vec<String> = results["variants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(variants, want);
    // Two columns per image filter: its accuracy (pass = 1) and its score.
    let scorers = ["shapeworld-verifier accuracy", "shapeworld-verifier"];
    assert_eq!(results["scorers"], serde_json::json!(scorers));
    let cells = results["cells"].as_array().unwrap();
    let cols: Vec<&str> = SKILLS.iter().copied().chain(["mean"]).collect();
    assert_eq!(cells.len(), want.len() * cols.len() * scorers.len());
    let cell = |v: &str, s: &str, sc: &str| {
        cells
            .iter()
            .find(|c| c["variant"] == v && c["skill"] == s && c["scorer"] == sc)
            .unwrap_or_else(|| panic!("no cell {v} x {s} x {sc}"))
    };
    for v in &want {
        for s in &cols {
            let c = cell(v, s, "shapeworld-verifier");
            // Accuracy counts fully verified images: never above the mean
            // share of checks that hold.
            let acc = cell(v, s, "shapeworld-verifier accuracy")["mean"]
                .as_f64()
                .unwrap();
            assert!(acc <= c["mean"].as_f64().unwrap() + 1e-9, "{v} {s}");
            assert_eq!(c["n"], SEEDS.len(), "{v} {s}: n counts seeds");
            let (m, lo, hi) = (
                c["mean"].as_f64().unwrap(),
                c["lo"].as_f64().unwrap(),
                c["hi"].as_f64().unwrap(),
            );
            assert!((0.0..=1.0).contains(&m), "{v} {s}: {m}");
            assert!(lo <= m + 1e-12 && m <= hi + 1e-12, "{v} {s}: {lo} {m} {hi}");
        }
    }
    let extra = results["extra"].as_array().unwrap();
    let table = |prefix: &str| {
        extra
            .iter()
            .find(|t| t["title"].as_str().unwrap().starts_with(prefix))
            .unwrap_or_else(|| panic!("no table {prefix}"))
    };
    // Per-seed breakdown: each aggregated cell is the mean of its seeds' means.
    let per_seed = table("Per-seed breakdown")["rows"].as_array().unwrap();
    // base once per seed; every other variant once per seed and data setting.
    assert_eq!(
        per_seed.len(),
        SEEDS.len() * want.len() * cols.len() * scorers.len()
    );
    for v in &want {
        for s in &cols {
            let rows: Vec<&serde_json::Value> = per_seed
                .iter()
                .filter(|r| r[0] == v.as_str() && r[2] == *s && r[3] == "shapeworld-verifier")
                .collect();
            assert_eq!(rows.len(), SEEDS.len(), "{v} {s}");
            let mut seeds: Vec<u64> = rows
                .iter()
                .map(|r| r[1].as_str().unwrap().parse().unwrap())
                .collect();
            seeds.sort();
            assert_eq!(seeds, SEEDS);
            let mean: f64 = rows
                .iter()
                .map(|r| r[4].as_str().unwrap().parse::<f64>().unwrap())
                .sum::<f64>()
                / SEEDS.len() as f64;
            let c = cell(v, s, "shapeworld-verifier");
            assert!((c["mean"].as_f64().unwrap() - mean).abs() < 1e-5, "{v} {s}");
            // Per-seed per-skill images: held-out prompts x images per prompt.
            if *s != "mean" {
                let n: usize = rows[0][7].as_str().unwrap().parse().unwrap();
                let per = if *s == "sw-single" { 2 } else { 1 };
                assert_eq!(n, 2 * per, "{v} {s}: images scored per seed");
            }
        }
    }
    // Per image, the accuracy column is the verifier's verdict: it passes an
    // image exactly when all of its checks hold (score 1).
    let mut files = 0;
    for d in std::fs::read_dir(run_dir.join("eval/scores")).unwrap() {
        for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
            let t: std::collections::BTreeMap<String, Vec<f64>> =
                serde_json::from_str(&std::fs::read_to_string(f.unwrap().path()).unwrap()).unwrap();
            let (acc, score) = (&t[scorers[0]], &t[scorers[1]]);
            assert_eq!(acc.len(), score.len());
            for (a, s) in acc.iter().zip(score) {
                assert_eq!(*a, if *s == 1.0 { 1.0 } else { 0.0 }, "{s}");
            }
            files += 1;
        }
    }
    assert!(files >= SKILLS.len(), "{files} score files");
    // The ablation table: one row per variant, skills + mean, intervals
    // containing their means.
    let abl = table("Ablation (shapeworld-verifier)");
    let header: Vec<&str> = abl["header"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap())
        .collect();
    assert_eq!(
        header,
        ["variant", SKILLS[0], SKILLS[1], "mean over skills"]
    );
    let rows = abl["rows"].as_array().unwrap();
    assert_eq!(rows.len(), want.len());
    for (row, v) in rows.iter().zip(&want) {
        assert_eq!(row[0], v.as_str());
        for x in row.as_array().unwrap()[1..].iter() {
            let (m, lo, hi) = parse_ci(x.as_str().unwrap());
            assert!(lo <= m && m <= hi, "{v}: {x}");
        }
    }
    // Pass rates: one row per skill; counts add up; rates in [0,1] and
    // equal to kept / images; the verdicts file agrees.
    let pass = table("Self-generated training data");
    let prows = pass["rows"].as_array().unwrap();
    assert_eq!(prows.len(), SKILLS.len());
    for row in prows {
        let row: Vec<&str> = row
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap())
            .collect();
        let (prompts, images, kept): (usize, usize, usize) = (
            row[1].parse().unwrap(),
            row[2].parse().unwrap(),
            row[3].parse().unwrap(),
        );
        assert!((1..=PROMPTS).contains(&prompts), "{row:?}");
        assert_eq!(images, prompts * PER_PROMPT, "{row:?}");
        // Independent expectation: the images at least as bright as the threshold.
        let want_kept = bright
            .iter()
            .filter(|b| b.0 == row[0] && b.1 >= threshold)
            .count();
        assert_eq!(kept, want_kept, "{row:?}");
        let rate = parse_pct(row[4]);
        assert!((0.0..=1.0).contains(&rate), "{row:?}");
        assert!((rate - kept as f64 / images as f64).abs() < 1e-3, "{row:?}");
        let verdicts =
            std::fs::read_to_string(run_dir.join(row[0]).join("images/verdicts.jsonl")).unwrap();
        let lines: Vec<serde_json::Value> = verdicts
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), images);
        assert_eq!(lines.iter().filter(|v| v["keep"] == true).count(), kept);
        // Unfiltered experts trained on every image, filtered ones on the
        // kept; each with round(n * 0.25 / 0.75) rendered replay scenes.
        let meta =
            std::fs::read_to_string(run_dir.join(row[0]).join("images/metadata.jsonl")).unwrap();
        assert_eq!(meta.lines().count(), kept);
        for seed in SEEDS {
            for (suffix, n) in [("", kept), (".unfiltered", images)] {
                let data = run_dir.join(format!("experts/{}{suffix}.seed{seed}.data", row[0]));
                let rows: Vec<serde_json::Value> =
                    std::fs::read_to_string(data.join("metadata.jsonl"))
                        .unwrap()
                        .lines()
                        .map(|l| serde_json::from_str(l).unwrap())
                        .collect();
                let replay = rows
                    .iter()
                    .filter(|r| r["file_name"].as_str().unwrap().contains("/replay/"))
                    .count();
                assert_eq!(rows.len() - replay, n, "{}", data.display());
                assert_eq!(replay, (n as f64 / 3.0).round() as usize);
                for r in &rows {
                    assert!(data.join(r["file_name"].as_str().unwrap()).is_file(), "{r}");
                }
            }
        }
    }
    let total_kept: usize = prows
        .iter()
        .map(|r| r[3].as_str().unwrap().parse::<usize>().unwrap())
        .sum();
    assert!(total_kept < bright.len(), "the filter dropped some image");
    // Every LoRA per seed and data setting exists.
    for seed in SEEDS {
        for suffix in ["", ".unfiltered"] {
            for name in SKILLS.iter().copied().chain(["joint"]) {
                let p = run_dir.join(format!("experts/{name}{suffix}.seed{seed}.safetensors"));
                assert!(p.is_file(), "{}", p.display());
            }
            for m in ["linear", "ties"] {
                let p = run_dir.join(format!("merged/{m}{suffix}.seed{seed}.safetensors"));
                assert!(p.is_file(), "{}", p.display());
            }
        }
    }
    // A second invocation does no work.
    let again = ok(selma()
        .arg("run")
        .arg(&cfg)
        .arg("--run-dir")
        .arg(&run_dir)
        .output()
        .unwrap());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("nothing to do"), "{err}");
}

/// examples/shapeworld.toml (the main job) and examples/shapeworld-ablation.toml
/// validate and run their prompts stage against a random ShapeWorld model at
/// their configured path (a temp copy of the layout); the plans list one
/// expert per skill + joint, for one seed and for 3 seeds x filtered/unfiltered.
#[test]
fn shapeworld_examples_validate() {
    let root = support::root();
    let dir = tempfile::tempdir().unwrap();
    let examples = dir.path().join("examples");
    std::fs::create_dir_all(&examples).unwrap();
    ok(selma()
        .args(["model", "init", "--preset", "shapeworld", "--out"])
        .arg(dir.path().join("models/shapeworld-base"))
        .output()
        .unwrap());
    for (file, units, last) in [
        ("shapeworld.toml", 5, "joint"),
        (
            "shapeworld-ablation.toml",
            3 * 2 * 5,
            "joint/unfiltered@seed2",
        ),
    ] {
        let text = std::fs::read_to_string(root.join("examples").join(file)).unwrap();
        std::fs::write(examples.join(file), &text).unwrap();
        let run_dir = dir.path().join(format!("run-{file}"));
        ok(selma()
            .arg("run")
            .arg(examples.join(file))
            .arg("--run-dir")
            .arg(&run_dir)
            .args(["--stages", "prompts"])
            .output()
            .unwrap());
        for k in ["sw-single", "sw-counting", "sw-binding", "sw-spatial"] {
            let p = run_dir.join(k).join("prompts.jsonl");
            assert!(
                std::fs::read_to_string(&p).unwrap().lines().count() >= 1,
                "{file}: {k}"
            );
        }
        let plan: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(run_dir.join(".selma/plan.json")).unwrap(),
        )
        .unwrap();
        let train: Vec<&str> = plan["train"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u.as_str().unwrap())
            .collect();
        assert_eq!(train.len(), units, "{file}: {train:?}");
        assert!(train.contains(&last), "{file}: {train:?}");
    }
}
