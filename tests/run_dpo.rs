//! `[train] objective = "dpo"` through the real `selma run`: each expert
//! trains Diffusion-DPO on pairs of draws of one prompt, an image the
//! filters kept over one they rejected (from `verdicts.jsonl`), and
//! settings that cannot work with it fail before any work, naming the key.
//! The random ShapeWorld model is made on the fly; `degenerate` with a
//! brightness threshold the test picks from the drawn images splits the
//! draws of a prompt into kept and rejected.

use crate::support::{ok, selma};

use std::collections::BTreeMap;
use std::process::Output;

fn run(cfg: &std::path::Path, run_dir: &std::path::Path, stages: &str) -> Output {
    selma()
        .arg("run")
        .arg(cfg)
        .arg("--run-dir")
        .arg(run_dir)
        .args(["--stages", stages])
        .output()
        .unwrap()
}

fn config(min_mean: f64, extra: &str) -> String {
    format!(
        r#"
[run]
seed = 1
[models]
teacher = "$RUN/model"
init_preset = "shapeworld"
[prompts]
generator = "template"
filters = []
count = 3
[[skills]]
name = "sw-counting"
[images]
per_prompt = 4
steps = 2
guidance = 1.5
filters = ["degenerate"]
[train]
rank = 2
alpha = 2.0
steps = 3
batch = 2
lr = 1e-4
resolution = 32
random_flip = false
save_every = 2
objective = "dpo"
dpo_beta = 100.0
{extra}
[eval]
prompts = 2
seed = 99
scorers = ["shapeworld-verifier"]
[params.degenerate]
min-mean = {min_mean}
"#
    )
}

#[derive(serde::Deserialize)]
struct Verdict {
    file_name: String,
    text: String,
    keep: bool,
}

#[test]
fn dpo_experts_train_on_kept_over_rejected_draws_of_one_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("pipeline.toml");
    let run_dir = dir.path().join("run");
    std::fs::write(&cfg, config(0.0, "")).unwrap();
    ok(run(&cfg, &run_dir, "prompts,images"));
    // A threshold between the second and third brightest draw of prompt 0.
    let images = run_dir.join("sw-counting/images");
    let mut first: Vec<f64> = (0..4)
        .map(|j| {
            let img = selma_diffusion::image_io::read_png(&images.join(format!("00000-{j}.png")))
                .unwrap();
            img.rgb.iter().map(|&b| b as f64).sum::<f64>() / img.rgb.len() as f64
        })
        .collect();
    first.sort_by(f64::total_cmp);
    assert!(first[1] < first[2], "equal brightness: {first:?}");
    std::fs::write(&cfg, config((first[1] + first[2]) / 2.0, "")).unwrap();
    let out = ok(run(&cfg, &run_dir, "prompts,images,train"));
    let stderr = String::from_utf8_lossy(&out.stderr);

    let verdicts: Vec<Verdict> = std::fs::read_to_string(images.join("verdicts.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(verdicts.len(), 12);
    // Expected pairs: per prompt, kept x rejected.
    let mut per: BTreeMap<&str, (Vec<&str>, Vec<&str>)> = BTreeMap::new();
    for v in &verdicts {
        let e = per.entry(v.text.as_str()).or_default();
        if v.keep {
            e.0.push(&v.file_name)
        } else {
            e.1.push(&v.file_name)
        }
    }
    let want: usize = per.values().map(|(k, r)| k.len() * r.len()).sum();
    assert!(want >= 4, "{want}");
    let pairs: Vec<serde_json::Value> =
        std::fs::read_to_string(run_dir.join("experts/sw-counting.data/pairs.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert_eq!(pairs.len(), want);
    let verdict = |f: &str| {
        let name = f.rsplit('/').next().unwrap();
        verdicts.iter().find(|v| v.file_name == name).unwrap()
    };
    for p in &pairs {
        let (w, l) = (
            verdict(p["winner"].as_str().unwrap()),
            verdict(p["loser"].as_str().unwrap()),
        );
        assert!(w.keep && !l.keep, "{p}");
        assert_eq!(w.text, l.text);
        assert_eq!(p["text"], w.text);
        assert!(run_dir
            .join("experts/sw-counting.data")
            .join(p["winner"].as_str().unwrap())
            .is_file());
    }
    assert!(
        stderr.contains(&format!("{want} preference pairs")),
        "{stderr}"
    );
    assert!(run_dir.join("experts/sw-counting.safetensors").is_file());
    let loss = std::fs::read_to_string(run_dir.join("experts/sw-counting.run/loss.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(loss.lines().next().unwrap()).unwrap();
    // The LoRA starts at zero: the policy is the reference, the loss log 2.
    let l0 = first["loss"].as_f64().unwrap();
    assert!((l0 - std::f64::consts::LN_2).abs() < 1e-3, "{l0}");

    // What cannot work with DPO fails before any work, naming the key.
    for (extra, key) in [
        (
            "[train.replay]\nshare = 0.3\nshapeworld = 20",
            "[train.replay]",
        ),
        (
            "[train.extra]\nobjective = \"sft\"",
            "train.extra.objective",
        ),
    ] {
        std::fs::write(&cfg, config(0.0, extra)).unwrap();
        let out = run(&cfg, &dir.path().join("bad"), "prompts");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(key), "{extra}: {err}");
    }
    let text = config(0.0, "").replace("objective = \"dpo\"\n", "");
    std::fs::write(&cfg, text).unwrap();
    let out = run(&cfg, &dir.path().join("bad"), "prompts");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("train.dpo_beta"),
        "{err}"
    );
}
