//! End-to-end tests of `selma shapeworld eval` on a random ShapeWorld model
//! (it draws noise, so these test the machinery, not accuracy): prompt sets
//! are seeded and are exactly `selma shapeworld prompts`' lists; a run is
//! reproducible; the batched sampler draws the same image as `selma
//! generate` for a prompt and seed; a LoRA whose B factors are zero gives
//! exactly the base's images and verdicts and a zero paired difference,
//! while a non-zero LoRA changes the images; the tables agree with the
//! per-image verdicts.

use crate::support;

use candle_core::{Device, Tensor};
use selma::eval::shapeworld::accuracy::EvalReport;
use selma::eval::shapeworld::paired::mcnemar_exact;
use selma_shapeworld::read_png;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use support::root;

fn selma() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_selma"));
    c.env("SELMA_CACHE_DIR", root().join("target/selma-test-cache"));
    c
}

fn run_ok(c: &mut Command) -> String {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{:?} failed:\n{}",
        c,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A random ShapeWorld-architecture model (32x32, pixel-unshuffle codec).
fn model(dir: &Path) -> PathBuf {
    let m = dir.join("model");
    run_ok(
        selma()
            .args([
                "model",
                "init",
                "--preset",
                "shapeworld",
                "--seed",
                "3",
                "--out",
            ])
            .arg(&m),
    );
    m
}

/// A peft LoRA of rank 4 on every attention projection of the UNet: A
/// random, B zero (`b_scale` 0) or random times `b_scale`.
fn lora(model: &Path, out: &Path, b_scale: f64) {
    let unet = model.join("unet/diffusion_pytorch_model.safetensors");
    let weights = candle_core::safetensors::load(&unet, &Device::Cpu).unwrap();
    let mut t = HashMap::new();
    for (key, w) in &weights {
        let Some(module) = key.strip_suffix(".weight") else {
            continue;
        };
        let proj = ["to_q", "to_k", "to_v", "to_out.0"]
            .iter()
            .any(|p| module.ends_with(&format!(".{p}")));
        if !proj || w.rank() != 2 {
            continue;
        }
        let (o, i) = w.dims2().unwrap();
        let a = Tensor::randn(0f32, 0.5, (4, i), &Device::Cpu).unwrap();
        let b = (Tensor::randn(0f32, 1.0, (o, 4), &Device::Cpu).unwrap() * b_scale).unwrap();
        t.insert(format!("unet.{module}.lora_A.weight"), a);
        t.insert(format!("unet.{module}.lora_B.weight"), b);
    }
    assert!(t.len() >= 8, "the UNet has attention projections");
    candle_core::safetensors::save(&t, out).unwrap();
}

fn eval(model: &Path, out: &Path, extra: &[&str]) -> (String, EvalReport) {
    let stdout = run_ok(
        selma()
            .args(["shapeworld", "eval", "--model"])
            .arg(model)
            .args(["--steps", "2", "--batch", "7", "-q", "--out"])
            .arg(out)
            .args(extra),
    );
    (stdout, EvalReport::read(out).unwrap())
}

#[test]
fn prompts_are_seeded_runs_reproduce_and_images_match_generate() {
    let d = tempfile::tempdir().unwrap();
    let m = model(d.path());
    let common = [
        "--prompts-per-skill",
        "4",
        "--noise-seeds",
        "11,22",
        "--prompt-seed",
        "9",
    ];
    let images = d.path().join("img");
    let mut args = common.to_vec();
    args.extend(["--images", images.to_str().unwrap()]);
    let (table, a) = eval(&m, &d.path().join("a.json"), &args);
    let (_, b) = eval(&m, &d.path().join("b.json"), &common);
    assert!(table.contains("verifier pass rate"), "{table}");
    assert!(table.contains("base"), "{table}");

    // Reproducible: same samples and the same verdicts.
    assert_eq!(a.samples, b.samples);
    assert_eq!(a.variants[0].pass, b.variants[0].pass);
    assert_eq!(a.variants[0].score, b.variants[0].score);
    assert_eq!(a.samples.len(), 4 * 4 * 2);

    // Each skill's prompts are `selma shapeworld prompts`' list for the seed,
    // each rendered under both noise seeds.
    for skill in ["single", "count", "binding", "spatial"] {
        let want = run_ok(selma().args([
            "shapeworld",
            "prompts",
            "--skill",
            skill,
            "--count",
            "4",
            "--seed",
            "9",
        ]));
        for ns in [11, 22] {
            let got: Vec<&str> = a
                .samples
                .iter()
                .filter(|s| s.skill == skill && s.noise_seed == ns)
                .map(|s| s.prompt.as_str())
                .collect();
            assert_eq!(got, want.lines().collect::<Vec<_>>(), "{skill} {ns}");
        }
    }
    // Another prompt seed draws other prompts.
    let (_, c) = eval(
        &m,
        &d.path().join("c.json"),
        &[
            "--prompts-per-skill",
            "4",
            "--noise-seeds",
            "11",
            "--prompt-seed",
            "10",
            "--skills",
            "spatial,binding",
        ],
    );
    assert_eq!(c.settings.skills, ["spatial", "binding"]);
    let spatial = |r: &EvalReport, ns: u64| -> Vec<String> {
        r.samples
            .iter()
            .filter(|s| s.skill == "spatial" && s.noise_seed == ns)
            .map(|s| s.prompt.clone())
            .collect()
    };
    assert_ne!(spatial(&a, 11), spatial(&c, 11));

    // The batched sampler draws what `selma generate` draws for the same
    // prompt and seed (batching may move a pixel by one level at most).
    for s in [&a.samples[0], &a.samples[13], &a.samples[31]] {
        let png = d.path().join(format!("gen-{}.png", s.seed));
        run_ok(
            selma()
                .args(["generate", "--model"])
                .arg(&m)
                .args(["--prompt", &s.prompt, "--seed", &s.seed.to_string()])
                .args([
                    "--steps",
                    "2",
                    "--guidance",
                    "1.5",
                    "--scheduler",
                    "ddim",
                    "--out",
                ])
                .arg(&png),
        );
        let (_, _, want) = read_png(&png).unwrap();
        let file = images
            .join("base")
            .join(format!("{}-{:04}-{}.png", s.skill, s.index, s.noise_seed));
        let (w, h, got) = read_png(&file).unwrap();
        assert_eq!((w, h), (32, 32));
        let max = want
            .iter()
            .zip(&got)
            .map(|(x, y)| (*x as i32 - *y as i32).abs())
            .max()
            .unwrap();
        assert!(max <= 1, "{:?}: pixels differ by up to {max}", s);
    }
}

#[test]
fn a_lora_with_zero_b_reproduces_the_base_and_a_real_one_does_not() {
    let d = tempfile::tempdir().unwrap();
    let m = model(d.path());
    let zero = d.path().join("zero.safetensors");
    let real = d.path().join("real.safetensors");
    lora(&m, &zero, 0.0);
    lora(&m, &real, 0.3);
    let images = d.path().join("img");
    let (table, r) = eval(
        &m,
        &d.path().join("r.json"),
        &[
            "--prompts-per-skill",
            "5",
            "--noise-seeds",
            "1,2",
            "--lora",
            &format!("zero={}", zero.display()),
            "--lora",
            &format!("real={}", real.display()),
            "--images",
            images.to_str().unwrap(),
        ],
    );
    let names: Vec<&str> = r.variants.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["base", "zero", "real"]);
    assert!(table.contains("paired change against base"), "{table}");

    // B = 0: the very same images, verdicts and scores; d = 0 everywhere.
    let (base, z) = (&r.variants[0], &r.variants[1]);
    assert_eq!(base.pass, z.pass);
    assert_eq!(base.score, z.score);
    let mut changed = 0;
    for s in &r.samples {
        let f = format!("{}-{:04}-{}.png", s.skill, s.index, s.noise_seed);
        let b = read_png(&images.join("base").join(&f)).unwrap().2;
        assert_eq!(b, read_png(&images.join("zero").join(&f)).unwrap().2, "{f}");
        if b != read_png(&images.join("real").join(&f)).unwrap().2 {
            changed += 1;
        }
    }
    assert!(
        changed * 2 > r.samples.len(),
        "a non-zero LoRA changes the images ({changed}/{})",
        r.samples.len()
    );
    for skill in ["single", "count", "binding", "spatial", "all"] {
        let p = &r.paired("zero", skill).unwrap().diff;
        assert_eq!((p.diff, p.lo, p.hi), (0.0, 0.0, 0.0), "{skill}");
        assert_eq!((p.better, p.worse, p.p_mcnemar), (0, 0, 1.0), "{skill}");
    }

    // The tables agree with the per-image verdicts, recounted here.
    for v in &r.variants {
        for skill in ["single", "count", "binding", "spatial", "all"] {
            let idx: Vec<usize> = (0..r.samples.len())
                .filter(|&i| skill == "all" || r.samples[i].skill == skill)
                .collect();
            let passed = idx.iter().filter(|&&i| v.pass[i]).count();
            let rate = r.rate(&v.name, skill).unwrap();
            assert_eq!(
                (rate.n, rate.passed),
                (idx.len(), passed),
                "{} {skill}",
                v.name
            );
            assert_eq!(rate.mean, passed as f64 / idx.len() as f64);
            assert!(rate.lo <= rate.mean && rate.mean <= rate.hi);
            if v.name != "base" {
                let better = idx.iter().filter(|&&i| v.pass[i] && !base.pass[i]).count();
                let worse = idx.iter().filter(|&&i| !v.pass[i] && base.pass[i]).count();
                let p = &r.paired(&v.name, skill).unwrap().diff;
                assert_eq!((p.n, p.better, p.worse), (idx.len(), better, worse));
                assert_eq!(p.diff, (better as f64 - worse as f64) / idx.len() as f64);
                assert_eq!(p.p_mcnemar, mcnemar_exact(worse, better));
            }
        }
        let count_samples = r.samples.iter().filter(|s| s.skill == "count").count();
        let buckets: usize = r
            .count_by_n
            .iter()
            .filter(|b| b.variant == v.name)
            .map(|b| b.n)
            .sum();
        assert_eq!(buckets, count_samples);
    }

    // Errors name the problem.
    let out = selma()
        .args(["shapeworld", "eval", "--model"])
        .arg(&m)
        .args(["--lora", "x=/nonexistent.safetensors", "-q"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("/nonexistent.safetensors"),
        "{err}"
    );
}

#[test]
fn selfgen_writes_a_training_folder_judged_by_the_verifier() {
    let d = tempfile::tempdir().unwrap();
    let m = model(d.path());
    let prompts = d.path().join("p.txt");
    std::fs::write(
        &prompts,
        "three red circles\n# a comment\na blue square\n\na green triangle left of a red circle\n",
    )
    .unwrap();
    let gen = |out: &Path, extra: &[&str]| {
        run_ok(
            selma()
                .args(["shapeworld", "selfgen", "--model"])
                .arg(&m)
                .arg("--prompts")
                .arg(&prompts)
                .args([
                    "--seed", "40", "--steps", "2", "--batch", "2", "-q", "--out",
                ])
                .arg(out)
                .args(extra),
        )
    };
    let all = d.path().join("all");
    let msg = gen(&all, &[]);
    assert!(msg.contains("rendered 3 images"), "{msg}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(all.join("metadata.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let texts: Vec<&str> = lines.iter().map(|l| l["text"].as_str().unwrap()).collect();
    assert_eq!(
        texts,
        [
            "three red circles",
            "a blue square",
            "a green triangle left of a red circle"
        ]
    );
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["seed"].as_u64().unwrap(), 40 + i as u64);
        let keep = l["keep"].as_bool().unwrap();
        let score = l["score"].as_f64().unwrap();
        assert_eq!(keep, score == 1.0, "{l}");
        let (w, h, _) = read_png(&all.join(l["file_name"].as_str().unwrap())).unwrap();
        assert_eq!((w, h), (32, 32));
    }
    // Image 1 is what `selma generate` draws for its prompt and seed 41.
    let png = d.path().join("g.png");
    run_ok(
        selma()
            .args(["generate", "--model"])
            .arg(&m)
            .args(["--prompt", "a blue square", "--seed", "41", "--steps", "2"])
            .args(["--guidance", "1.5", "--out"])
            .arg(&png),
    );
    let want = read_png(&png).unwrap().2;
    let got = read_png(&all.join(lines[1]["file_name"].as_str().unwrap()))
        .unwrap()
        .2;
    let max = want
        .iter()
        .zip(&got)
        .map(|(x, y)| (*x as i32 - *y as i32).abs())
        .max()
        .unwrap();
    assert!(max <= 1, "pixels differ by up to {max}");
    // --only-passing keeps exactly the passing lines.
    let kept = d.path().join("kept");
    gen(&kept, &["--only-passing"]);
    let n_keep = lines.iter().filter(|l| l["keep"] == true).count();
    let n_lines = std::fs::read_to_string(kept.join("metadata.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(n_lines, n_keep);
    // An existing dataset is not overwritten.
    let out = selma()
        .args(["shapeworld", "selfgen", "--model"])
        .arg(&m)
        .arg("--prompts")
        .arg(&prompts)
        .arg("--out")
        .arg(&all)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("already holds"),
        "{err}"
    );
}
