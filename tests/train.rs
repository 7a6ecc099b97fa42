//! `selma train` end to end with the real binary on the tiny model: flags
//! and a TOML file (flags win), plain progress lines and the JSONL loss log,
//! checkpoints and `--resume` (byte-identical output to a straight run),
//! `--format kohya`, dataset errors that name the file (`--skip-bad` skips
//! with a warning), must-show 5 through the binary (the trainer's in-memory
//! validation render equals `selma generate --lora` with the peft and the
//! kohya file), and `--full` writing a model folder that `selma generate` loads.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use selma_diffusion::image_io::{read_png, write_png};

fn selma() -> Command {
    Command::new(env!("CARGO_BIN_EXE_selma"))
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("selma runs");
    assert!(
        out.status.success(),
        "selma failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().expect("selma runs");
    assert!(!out.status.success(), "selma should have failed");
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn init_tiny(dir: &Path) -> PathBuf {
    let model = dir.join("tiny");
    run_ok(
        selma()
            .args(["model", "init", "--preset", "tiny", "--seed", "0", "--out"])
            .arg(&model),
    );
    model
}

/// Two 64x64 PNGs with metadata.jsonl (plus `extra` raw lines).
fn dataset(dir: &Path, extra: &str) -> PathBuf {
    let d = dir.join("data");
    std::fs::create_dir_all(&d).unwrap();
    let mut meta = String::new();
    for i in 0..2u32 {
        let px: Vec<u8> = (0..64 * 64)
            .flat_map(|p| {
                let (x, y) = (p % 64, p / 64);
                [
                    (x * 4 + i * 90) as u8,
                    (y * 4) as u8,
                    if (x / 8 + y / 8 + i) % 2 == 0 {
                        230
                    } else {
                        20
                    },
                ]
            })
            .collect();
        let name = format!("img{i}.png");
        write_png(&d.join(&name), 64, 64, &px, "").unwrap();
        meta.push_str(&format!(
            "{{\"file_name\": \"{name}\", \"text\": \"a checkered pattern number {i}\"}}\n"
        ));
    }
    meta.push_str(extra);
    std::fs::write(d.join("metadata.jsonl"), meta).unwrap();
    d
}

const SMALL: [&str; 12] = [
    "--batch",
    "2",
    "--grad-accum",
    "1",
    "--resolution",
    "64",
    "--rank",
    "4",
    "--alpha",
    "4",
    "--lr",
    "1e-2",
];

fn train(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Output {
    run_ok(
        selma()
            .args(["train", "--model"])
            .arg(model)
            .arg("--data")
            .arg(data)
            .arg("--out")
            .arg(out)
            .args(SMALL)
            .args(extra),
    )
}

fn run_dir(out: &Path) -> PathBuf {
    PathBuf::from(format!("{}.run", out.display()))
}

#[test]
fn flags_progress_loss_log_checkpoints_and_exact_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let model = init_tiny(t);
    let data = dataset(t, "");

    let a = t.join("a.safetensors");
    let out = train(&model, &data, &a, &["--steps", "4", "--save-every", "2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("training 32 LoRA layers (rank 4"), "{err}");
    assert!(err.contains("step 4/4 loss "), "no progress lines: {err}");
    assert!(err.contains("step/s eta"), "{err}");
    let log = std::fs::read_to_string(run_dir(&a).join("loss.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["step"], i as u64 + 1);
        assert!(l["loss"].as_f64().unwrap() > 0.0);
    }
    assert!(run_dir(&a).join("checkpoint-2/state.json").is_file());
    assert!(run_dir(&a)
        .join("checkpoint-4/tensors.safetensors")
        .is_file());
    let file = selma_lora::LoraFile::load(&a, &candle_core::Device::Cpu).unwrap();
    assert_eq!(file.layers.len(), 32);
    assert!(file
        .layers
        .values()
        .all(|l| l.rank() == 4 && l.alpha == 4.0));

    // 2 updates, then --resume to 4: the same bytes as the straight run.
    let c = t.join("c.safetensors");
    train(&model, &data, &c, &["--steps", "2", "--save-every", "2"]);
    let resumed = run_ok(
        selma()
            .args(["train", "--model"])
            .arg(&model)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&c)
            .args(SMALL)
            .args(["--steps", "4", "--save-every", "2", "--resume"])
            .arg(run_dir(&c)),
    );
    let err = String::from_utf8_lossy(&resumed.stderr);
    assert!(err.contains("step 4/4"), "{err}");
    assert!(!err.contains("step 1/4"), "resume restarted: {err}");
    // Same tensors, bit for bit (the file's metadata JSON order may differ).
    let load = |p: &Path| {
        let m = candle_core::safetensors::load(p, &candle_core::Device::Cpu).unwrap();
        let mut v: Vec<(String, Vec<u32>)> = m
            .into_iter()
            .map(|(k, t)| {
                let x: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                (k, x.into_iter().map(f32::to_bits).collect())
            })
            .collect();
        v.sort();
        v
    };
    let (la, lc) = (load(&a), load(&c));
    assert_eq!(la.len(), 64);
    assert!(la == lc, "resumed LoRA differs from the straight run");
    let log = std::fs::read_to_string(run_dir(&c).join("loss.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 4);
    assert_eq!(
        log.lines().last().unwrap(),
        std::fs::read_to_string(run_dir(&a).join("loss.jsonl"))
            .unwrap()
            .lines()
            .last()
            .unwrap(),
        "the resumed run's last loss differs"
    );
}

#[test]
fn toml_config_flags_override_and_kohya_format() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let model = init_tiny(t);
    let data = dataset(t, "");
    let out = t.join("k.safetensors");
    let cfg = t.join("train.toml");
    std::fs::write(
        &cfg,
        format!(
            "model = {:?}\ndata = {:?}\nout = {:?}\nsteps = 5\nbatch = 2\ngrad_accum = 1\n\
             resolution = 64\nrank = 4\nalpha = 2.0\nformat = \"kohya\"\nsave_every = 0\n\
             caption_dropout = 0.5\nema_decay = 0.9\n\n[adam]\nbeta1 = 0.9\nbeta2 = 0.99\n\
             eps = 1e-8\nweight_decay = 0.0\n",
            model.display().to_string(),
            data.display().to_string(),
            out.display().to_string()
        ),
    )
    .unwrap();
    let o = run_ok(
        selma()
            .args(["train", "--config"])
            .arg(&cfg)
            .args(["--steps", "3"]),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("kohya format, 3 updates, EMA 0.9"), "{err}");
    let log = std::fs::read_to_string(run_dir(&out).join("loss.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 3, "--steps did not override the file");
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names = st.names();
    assert!(!names.is_empty());
    assert!(
        names.iter().all(|n| n.starts_with("lora_unet_")),
        "{names:?}"
    );
    assert!(names.iter().any(|n| n.ends_with(".lora_down.weight")));
    assert!(names.iter().any(|n| n.ends_with(".alpha")));
    let file = selma_lora::LoraFile::load(&out, &candle_core::Device::Cpu).unwrap();
    assert!(file
        .layers
        .values()
        .all(|l| l.rank() == 4 && l.alpha == 2.0));

    // A misspelt key is an error naming the file and the key.
    let bad = t.join("bad.toml");
    std::fs::write(&bad, "stpes = 3\n").unwrap();
    let e = run_err(selma().args(["train", "--config"]).arg(&bad));
    assert!(e.contains("bad.toml") && e.contains("stpes"), "{e}");
}

#[test]
fn bad_dataset_entries_are_named_or_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let model = init_tiny(t);
    let data = dataset(
        t,
        "{\"file_name\": \"missing.png\", \"text\": \"not there\"}\n",
    );
    let out = t.join("x.safetensors");
    let e = run_err(
        selma()
            .args(["train", "--model"])
            .arg(&model)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&out)
            .args(SMALL)
            .args(["--steps", "1"]),
    );
    assert!(e.contains("missing.png"), "{e}");
    assert!(!out.exists());
    let o = train(&model, &data, &out, &["--steps", "1", "--skip-bad"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("warning") && err.contains("missing.png"),
        "{err}"
    );
    assert!(err.contains("on 2 images"), "{err}");
    assert!(out.is_file());
    // An unreadable image is named too.
    std::fs::write(data.join("img1.png"), b"not a png").unwrap();
    let e = run_err(
        selma()
            .args(["train", "--model"])
            .arg(&model)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(t.join("y.safetensors"))
            .args(SMALL)
            .args(["--steps", "1"]),
    );
    assert!(e.contains("img1.png"), "{e}");
}

/// Must-show 5 through the binary: the validation image rendered by
/// `selma train` with its in-memory adapters at the last update equals
/// `selma generate --lora` with the saved peft file and with the kohya file.
#[test]
fn saved_peft_and_kohya_loras_render_like_the_in_memory_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let model = init_tiny(t);
    let data = dataset(t, "");
    let prompt = "a checkered pattern number 1";
    let mut files = vec![];
    let mut validation = vec![];
    for fmt in ["peft", "kohya"] {
        let out = t.join(format!("{fmt}.safetensors"));
        train(
            &model,
            &data,
            &out,
            &[
                "--steps",
                "6",
                "--format",
                fmt,
                "--validation-prompt",
                prompt,
                "--validation-every",
                "6",
            ],
        );
        validation.push(
            read_png(&run_dir(&out).join("validation/step-6-0.png"))
                .unwrap()
                .rgb,
        );
        files.push(out);
    }
    assert_eq!(validation[0], validation[1], "same seed, same training");
    let gen = |extra: &[&str], name: &str| {
        let png = t.join(name);
        run_ok(
            selma()
                .args(["generate", "--model"])
                .arg(&model)
                .args(["--prompt", prompt, "--steps", "20", "--guidance", "7.5"])
                .args(["--scheduler", "ddim", "--seed", "0", "--size", "64x64"])
                .args(extra)
                .arg("--out")
                .arg(&png),
        );
        read_png(&png).unwrap().rgb
    };
    let base = gen(&[], "base.png");
    let changed = base
        .iter()
        .zip(&validation[0])
        .filter(|(a, b)| a != b)
        .count();
    assert!(
        changed > 100,
        "the trained LoRA changes only {changed} bytes"
    );
    for f in &files {
        let img = gen(&["--lora", f.to_str().unwrap()], "lora.png");
        assert!(
            img == validation[0],
            "{} renders differently from the in-memory adapters",
            f.display()
        );
    }
}

#[test]
fn full_training_writes_a_model_folder_that_generates() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let model = init_tiny(t);
    let data = dataset(t, "");
    let out = t.join("trained-model");
    let o = run_ok(
        selma()
            .args(["train", "--full", "--model"])
            .arg(&model)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&out)
            .args(["--batch", "2", "--grad-accum", "1", "--resolution", "64"])
            .args(["--lr", "1e-3", "--steps", "3", "--save-every", "2"])
            .args(["--caption-dropout", "0.1", "--ema-decay", "0.9"]),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("training all weights of unet + text_encoder"),
        "{err}"
    );
    assert!(err.contains("wrote the model folder"), "{err}");
    for f in [
        "model_index.json",
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert!(run_dir(&out).join("checkpoint-3/state.json").is_file());
    let png = |m: &Path, name: &str| {
        let p = t.join(name);
        run_ok(
            selma()
                .args(["generate", "--model"])
                .arg(m)
                .args(["--prompt", "a checkered pattern number 0", "--steps", "4"])
                .args(["--seed", "1", "--size", "64x64", "--out"])
                .arg(&p),
        );
        read_png(&p).unwrap().rgb
    };
    assert_ne!(png(&out, "trained.png"), png(&model, "base.png"));
}
