//! The shipped ShapeWorld base model (models/shapeworld-base) end to end
//! with the real binary: it loads, `selma generate --prompts ... --verify
//! shapeworld-verifier` draws 32x32 images for a fixed prompt set (the first
//! prompts of models/shapeworld-base/eval/<skill>.txt, fixed seeds, DDIM 25
//! steps, CFG 1.5, as the model's README says), and the verifier's mean
//! score per skill (the share of its checks that hold: count, each named
//! object, the relation) lies within a band around the value measured when
//! the model was released. The mean score separates models more finely than
//! the pass rate on 24 images: the same set scores 0.29 / 0.04 / 0.13 / 0.06
//! (single / count / binding / spatial) with the random initial weights and
//! 0.40 / 0.34 / 0.42 / 0.28 with the earlier 750-update release, outside
//! every band.
//! A broken codec, sampler, tokenizer or loader draws shapeless colour and
//! falls out of the band; the band leaves room for floating-point
//! differences between CPUs.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Prompts per skill in the guard, images per prompt, and the base seed.
const PROMPTS: usize = 12;
const PER_PROMPT: usize = 2;
const SEED: u64 = 0;

/// Mean verifier scores measured on this exact set at release (release
/// build, x86-64), and how far a run may stray from them.
const EXPECTED: [(&str, f64); 4] = [
    ("single", 0.875),
    ("count", 0.758),
    ("binding", 0.708),
    ("spatial", 0.594),
];
const SKILL_BAND: f64 = 0.09;
const MEAN_BAND: f64 = 0.05;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

/// The verifier's (score, keep) of every image in a `--prompts` output folder.
fn verdicts(dir: &Path) -> Vec<(f64, bool)> {
    let text = std::fs::read_to_string(dir.join("metadata.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let file = dir.join(v["file_name"].as_str().unwrap());
            let png = selma_diffusion::image_io::read_png(&file).unwrap();
            assert_eq!((png.width, png.height), (32, 32), "{}", file.display());
            (v["score"].as_f64().unwrap(), v["keep"].as_bool().unwrap())
        })
        .collect()
}

#[test]
fn shipped_base_model_generates_within_its_accuracy_band() {
    let model = root().join("models/shapeworld-base");
    assert!(
        model.join("model_index.json").is_file(),
        "{} is missing",
        model.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let mut scores = vec![];
    for (skill, expected) in EXPECTED {
        let all = std::fs::read_to_string(model.join("eval").join(format!("{skill}.txt"))).unwrap();
        let prompts: Vec<&str> = all.lines().take(PROMPTS).collect();
        assert_eq!(prompts.len(), PROMPTS);
        let file = tmp.path().join(format!("{skill}.txt"));
        std::fs::write(&file, prompts.join("\n")).unwrap();
        let out = tmp.path().join(skill);
        let res = Command::new(env!("CARGO_BIN_EXE_selma"))
            .args(["generate", "--model"])
            .arg(&model)
            .arg("--prompts")
            .arg(&file)
            .args(["--steps", "25", "--guidance", "1.5", "--scheduler", "ddim"])
            .args(["--batch", &PER_PROMPT.to_string()])
            .args(["--seed", &SEED.to_string()])
            .args(["--verify", "shapeworld-verifier", "--out"])
            .arg(&out)
            .output()
            .expect("selma runs");
        assert!(
            res.status.success(),
            "selma generate failed:\n{}",
            String::from_utf8_lossy(&res.stderr)
        );
        let v = verdicts(&out);
        assert_eq!(v.len(), PROMPTS * PER_PROMPT);
        // the verdict agrees with the score: pass exactly when every check holds
        assert!(v.iter().all(|(s, k)| *k == (*s == 1.0)));
        let score = v.iter().map(|(s, _)| s).sum::<f64>() / v.len() as f64;
        let rate = v.iter().filter(|(_, k)| *k).count() as f64 / v.len() as f64;
        eprintln!("{skill}: mean score {score:.3} (expected {expected:.3}), pass rate {rate:.3}");
        scores.push((skill, score, expected));
    }
    let mean = scores.iter().map(|r| r.1).sum::<f64>() / scores.len() as f64;
    let want = scores.iter().map(|r| r.2).sum::<f64>() / scores.len() as f64;
    for (skill, score, expected) in &scores {
        assert!(
            (score - expected).abs() <= SKILL_BAND,
            "{skill}: mean verifier score {score:.3} is outside {expected:.3} +- {SKILL_BAND}"
        );
    }
    assert!(
        (mean - want).abs() <= MEAN_BAND,
        "mean verifier score {mean:.3} over the skills is outside {want:.3} +- {MEAN_BAND}"
    );
}

#[test]
fn model_init_keeps_every_shapeworld_word_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sw");
    let res = Command::new(env!("CARGO_BIN_EXE_selma"))
        .args([
            "model",
            "init",
            "--preset",
            "shapeworld",
            "--seed",
            "0",
            "--out",
        ])
        .arg(&out)
        .output()
        .expect("selma runs");
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    for dir in [
        out.join("tokenizer"),
        root().join("models/shapeworld-base/tokenizer"),
    ] {
        let tok = selma_diffusion::tokenizer::ClipTokenizer::from_dir(&dir).unwrap();
        let mut ids = std::collections::BTreeSet::new();
        for w in selma_shapeworld::caption::VOCABULARY {
            let t = tok.encode(w).unwrap();
            assert_eq!(t.len(), 1, "{}: {w:?} -> {t:?}", dir.display());
            ids.insert(t[0]);
        }
        assert_eq!(ids.len(), selma_shapeworld::caption::VOCABULARY.len());
    }
}
