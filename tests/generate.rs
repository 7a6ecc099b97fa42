//! `selma model init` + `selma generate` end to end with the real binary on
//! the tiny model: same seed -> same bytes, another seed -> another image,
//! the PNG carries the parameters, `--latents` reproduces seeded noise,
//! batches are numbered files, errors name the folder.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device};
use selma_diffusion::image_io::read_png;
use selma_diffusion::scheduler::GaussianRng;

fn selma() -> Command {
    Command::new(env!("CARGO_BIN_EXE_selma"))
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("selma runs");
    assert!(
        out.status.success(),
        "selma failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
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

fn generate(model: &Path, out: &Path, extra: &[&str]) {
    run_ok(
        selma()
            .args(["generate", "--model"])
            .arg(model)
            .args([
                "--prompt",
                "a red cube on a blue table",
                "--negative",
                "blurry",
            ])
            .args(["--steps", "3", "--size", "64x64"])
            .args(extra)
            .arg("--out")
            .arg(out),
    );
}

#[test]
fn same_seed_same_bytes_other_seed_other_image() {
    let tmp = tempfile::tempdir().unwrap();
    let model = init_tiny(tmp.path());
    let (a, b, c) = (
        tmp.path().join("a.png"),
        tmp.path().join("b.png"),
        tmp.path().join("c.png"),
    );
    generate(&model, &a, &["--seed", "1"]);
    generate(&model, &b, &["--seed", "1"]);
    generate(&model, &c, &["--seed", "2"]);
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let (ia, ic) = (read_png(&a).unwrap(), read_png(&c).unwrap());
    assert_eq!((ia.width, ia.height), (64, 64));
    assert_ne!(ia.rgb, ic.rgb);
    // the parameters chunk, A1111 style
    let p = ia.parameters.expect("parameters text chunk");
    assert!(
        p.starts_with("a red cube on a blue table\nNegative prompt: blurry\n"),
        "{p}"
    );
    for want in [
        "Steps: 3",
        "Sampler: ddim",
        "CFG scale: 7.5",
        "Seed: 1",
        "Size: 64x64",
        "Model: tiny",
    ] {
        assert!(p.contains(want), "missing {want:?} in {p:?}");
    }
    // no temp files left behind
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn latents_file_reproduces_the_seeded_noise_and_batches_are_numbered() {
    let tmp = tempfile::tempdir().unwrap();
    let model = init_tiny(tmp.path());
    // The seeded noise of seed 7, written as a --latents file.
    let z = GaussianRng::new(7)
        .randn((1, 4, 8, 8), &Device::Cpu, DType::F32)
        .unwrap();
    let lat = tmp.path().join("noise.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("latents".to_string(), z)]),
        &lat,
    )
    .unwrap();
    let (from_file, from_seed) = (tmp.path().join("f.png"), tmp.path().join("s.png"));
    generate(
        &model,
        &from_file,
        &["--latents", lat.to_str().unwrap(), "--eta", "0"],
    );
    generate(&model, &from_seed, &["--seed", "7"]);
    let (f, s) = (read_png(&from_file).unwrap(), read_png(&from_seed).unwrap());
    assert_eq!(
        f.rgb, s.rgb,
        "DDIM eta 0 from a latents file must equal the same noise from its seed"
    );
    assert!(f.parameters.unwrap().contains("Latents: "));
    // batch 2 from seed 6: out-1.png is the seed-7 image
    let batch = tmp.path().join("batch.png");
    generate(&model, &batch, &["--seed", "6", "--batch", "2"]);
    let b1 = read_png(&tmp.path().join("batch-1.png")).unwrap();
    assert!(tmp.path().join("batch-0.png").is_file());
    let close = b1
        .rgb
        .iter()
        .zip(&s.rgb)
        .all(|(p, q)| (*p as i32 - *q as i32).abs() <= 1);
    assert!(close, "batch element 1 of seed 6 must match seed 7");
    assert!(b1.parameters.unwrap().contains("Seed: 7"));
}

#[test]
fn errors_name_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    let out = selma()
        .args(["generate", "--prompt", "x", "--model"])
        .arg(&missing)
        .arg("--out")
        .arg(tmp.path().join("x.png"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nope") && err.contains("model_index.json"),
        "{err}"
    );
    let model = init_tiny(tmp.path());
    let out = selma()
        .args(["generate", "--prompt", "x", "--size", "60x64", "--model"])
        .arg(&model)
        .arg("--out")
        .arg(tmp.path().join("x.png"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("multiples of 8"));
    let out = selma()
        .args([
            "generate",
            "--prompt",
            "x",
            "--scheduler",
            "heun",
            "--model",
        ])
        .arg(&model)
        .arg("--out")
        .arg(tmp.path().join("x.png"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("dpm++2m"));
}

fn lora_file(dir: &Path, name: &str, zero_up: bool, format: selma_lora::LoraFormat) -> PathBuf {
    use selma_lora::{LoraFile, LoraLayer};
    let dev = Device::Cpu;
    let mut rng = GaussianRng::new(99);
    let mut layers = std::collections::BTreeMap::new();
    // (module, in, out): self- and cross-attention of the UNet, one CLIP projection
    for (m, i, o) in [
        (
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            32,
            32,
        ),
        (
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
            32,
            32,
        ),
        (
            "unet.up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",
            128,
            32,
        ),
        (
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
            32,
            32,
        ),
    ] {
        let r = 4;
        let up = if zero_up {
            candle_core::Tensor::zeros((o, r), DType::F32, &dev).unwrap()
        } else {
            (rng.randn((o, r), &dev, DType::F32).unwrap() * 0.5).unwrap()
        };
        let down = (rng.randn((r, i), &dev, DType::F32).unwrap() * 0.5).unwrap();
        layers.insert(m.to_string(), LoraLayer::new(up, down, 4.0).unwrap());
    }
    let path = dir.join(name);
    LoraFile {
        layers,
        metadata: Default::default(),
    }
    .save(&path, format)
    .unwrap();
    path
}

#[test]
fn lora_files_runtime_merged_peft_and_kohya() {
    use selma_lora::LoraFormat;
    let tmp = tempfile::tempdir().unwrap();
    let model = init_tiny(tmp.path());
    let t = tmp.path();
    let png = |name: &str, extra: &[&str]| {
        let out = t.join(name);
        let mut args = vec!["--seed", "3"];
        args.extend_from_slice(extra);
        generate(&model, &out, &args);
        read_png(&out).unwrap().rgb
    };
    let base = png("base.png", &[]);
    let zero = lora_file(t, "zero.safetensors", true, LoraFormat::Peft);
    assert_eq!(
        png("zero.png", &["--lora", zero.to_str().unwrap()]),
        base,
        "B = 0 changes nothing"
    );
    let peft = lora_file(t, "peft.safetensors", false, LoraFormat::Peft);
    let kohya = lora_file(t, "kohya.safetensors", false, LoraFormat::Kohya);
    let spec = format!("{}:0.8", peft.display());
    let runtime = png("rt.png", &["--lora", &spec]);
    assert_ne!(runtime, base, "a LoRA changes the image");
    let merged = png("merged.png", &["--lora", &spec, "--merge-lora"]);
    let close = |x: &[u8], y: &[u8]| {
        x.iter()
            .zip(y)
            .all(|(p, q)| (*p as i32 - *q as i32).abs() <= 1)
    };
    assert!(
        close(&runtime, &merged),
        "runtime adapters and merged weights agree"
    );
    let k = png(
        "kohya.png",
        &["--lora", &format!("{}:0.8", kohya.display())],
    );
    assert!(
        close(&runtime, &k),
        "kohya and peft files of the same LoRA agree"
    );
    // weight 0 is the base model
    assert!(close(
        &png("w0.png", &["--lora", &format!("{}:0", peft.display())]),
        &base
    ));
}
