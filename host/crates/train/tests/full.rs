//! Full fine-tuning (`full = true`) on the tiny model: every UNet and
//! text-encoder weight gets a gradient, training lowers a fixed validation
//! loss, resume is bit-identical (weights, AdamW moments, EMA), EMA equals a
//! hand-computed average of the parameter trajectory (full and LoRA mode),
//! and the written diffusers folder loads and renders like the trainer's
//! output weights.

use crate::common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use selma_diffusion::pipeline::StableDiffusion;
use selma_train::trainer::{TrainConfig, Trainer};

fn full_config(dir: &std::path::Path, name: &str) -> TrainConfig {
    let mut cfg = common::config_in(dir, name);
    cfg.full = true;
    cfg.lr = 1e-3;
    cfg.grad_accum = 1;
    cfg
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn bits(m: &HashMap<String, Tensor>) -> Vec<(String, Vec<u32>)> {
    let mut v: Vec<_> = m
        .iter()
        .map(|(k, t)| (k.clone(), flat(t).iter().map(|f| f.to_bits()).collect()))
        .collect();
    v.sort();
    v
}

fn render(sd: &StableDiffusion, prompt: &str) -> Vec<u8> {
    common::render(sd, prompt, 5)
}

#[test]
fn every_weight_gets_a_gradient_and_training_lowers_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = full_config(dir.path(), "full-out");
    cfg.steps = 40;
    cfg.save_every = 0;
    cfg.crop = selma_train::dataset::Crop::Center;
    cfg.random_flip = false;
    cfg.noise_offset = 0.0;
    cfg.min_snr_gamma = None;
    let mut t = Trainer::new(cfg).unwrap();
    assert!(t.lora.layers.is_empty());
    let comps: Vec<&str> = t.full.iter().map(|p| p.component.as_str()).collect();
    assert_eq!(comps, ["unet", "text_encoder"]);
    // Every stored UNet/text-encoder weight is trained (CLIP's position_ids buffer excepted).
    let unet_keys =
        selma_diffusion::weights::SafetensorsSource::from_dir(&t.cfg.model.join("unet")).unwrap();
    use selma_diffusion::weights::TensorSource;
    assert_eq!(t.full[0].vars.len(), unet_keys.keys().len());
    assert_eq!(t.names.len(), t.opt.params.len());

    let before = t.eval_loss(99, 8).unwrap();
    let (loss, grads) = t.micro_batch().unwrap();
    assert!(loss.is_finite());
    let mut missing = vec![];
    for (name, g) in t.names.iter().zip(&grads) {
        let nz = g.as_ref().is_some_and(|g| {
            g.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        });
        if !nz {
            missing.push(name.clone());
        }
    }
    assert!(missing.is_empty(), "no gradient for {missing:?}");
    // Text embeddings are computed in the graph: no cache files.
    assert!(!t.cfg.run_dir().join("text-cache").exists());

    t.run(|_| {}).unwrap();
    let after = t.eval_loss(99, 8).unwrap();
    eprintln!("full training: validation loss before {before:.5}, after {after:.5}");
    assert!(
        after < 0.9 * before,
        "validation loss did not drop by 10%: {before} -> {after}"
    );
}

#[test]
fn full_resume_is_bit_identical_with_ema_and_caption_dropout() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg_a = full_config(dir.path(), "a-out");
    cfg_a.steps = 6;
    cfg_a.save_every = 3;
    cfg_a.ema_decay = 0.9;
    cfg_a.caption_dropout = 0.3;
    let mut a = Trainer::new(cfg_a.clone()).unwrap();
    a.run(|_| {}).unwrap();

    let mut cfg_b = cfg_a.clone();
    cfg_b.out = dir.path().join("b-out");
    cfg_b.run_dir = None;
    cfg_b.steps = 3;
    Trainer::new(cfg_b.clone()).unwrap().run(|_| {}).unwrap();
    cfg_b.steps = 6;
    let mut c = Trainer::new(cfg_b.clone()).unwrap();
    c.resume(&cfg_b.run_dir()).unwrap();
    assert_eq!(c.state.step, 3);
    c.run(|_| {}).unwrap();
    assert_eq!(c.state, a.state);
    assert_eq!(c.opt.step, a.opt.step);
    let (ta, tc) = (a.state_tensors(), c.state_tensors());
    // weights, two moments and the EMA for every trained tensor
    assert_eq!(ta.len(), 4 * a.names.len());
    assert!(
        bits(&ta) == bits(&tc),
        "full-mode state differs after resume"
    );
    // The written folders are byte-identical too.
    let wa = std::fs::read(cfg_a.out.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let wc = std::fs::read(cfg_b.out.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    assert!(wa == wc);

    // A LoRA checkpoint cannot be resumed in full mode.
    let mut lora_cfg = cfg_a.clone();
    lora_cfg.full = false;
    lora_cfg.out = dir.path().join("l.safetensors");
    let mut l = Trainer::new(lora_cfg).unwrap();
    let e = format!("{:#}", l.resume(&cfg_a.run_dir()).unwrap_err());
    assert!(e.contains("full"), "{e}");
}

/// Hand-computed EMA (diffusers' rule, f32 arithmetic) of recorded trajectories.
fn hand_ema(traj: &[Vec<f32>], decay: f64, warmup: bool) -> Vec<f32> {
    let mut s = traj[0].clone();
    for (k, p) in traj.iter().enumerate().skip(1) {
        let step = (k - 1) as f64; // update k (1-based) uses s = k - 1
        let d = if !warmup {
            decay
        } else if step == 0.0 {
            0.0
        } else {
            ((1.0 + step) / (10.0 + step)).min(decay)
        };
        let om = (1.0 - d) as f32;
        for (si, pi) in s.iter_mut().zip(p) {
            *si -= (*si - *pi) * om;
        }
    }
    s
}

fn check_ema(cfg: TrainConfig, steps: usize) {
    let decay = cfg.ema_decay;
    let warmup = cfg.ema_warmup;
    let mut t = Trainer::new(cfg).unwrap();
    let n = t.opt.params.len();
    let mut traj: Vec<Vec<Vec<f32>>> = vec![vec![]; n];
    let record = |t: &Trainer, traj: &mut Vec<Vec<Vec<f32>>>| {
        for (i, p) in t.opt.params.iter().enumerate() {
            traj[i].push(flat(p.as_tensor()));
        }
    };
    record(&t, &mut traj);
    for _ in 0..steps {
        t.train_step().unwrap();
        record(&t, &mut traj);
    }
    let ema = t.ema.as_ref().unwrap();
    assert_eq!(ema.updates, steps as u64);
    let mut worst = 0f32;
    let mut moved = 0usize;
    for (i, tr) in traj.iter().enumerate() {
        let want = hand_ema(tr, decay, warmup);
        let got = flat(&ema.shadow[i]);
        for ((g, w), p) in got.iter().zip(&want).zip(tr.last().unwrap()) {
            worst = worst.max((g - w).abs() / w.abs().max(1e-3));
            if g != p {
                moved += 1;
            }
        }
    }
    // The same f32 operations in the same order: exactly equal.
    assert!(
        worst == 0.0,
        "EMA differs from the hand computation by {worst}"
    );
    assert!(
        moved > 0,
        "the EMA equals the raw weights: nothing averaged"
    );
    // The output uses the EMA weights; the current weights are put back exactly.
    let before: Vec<Vec<f32>> = t.opt.params.iter().map(|p| flat(p.as_tensor())).collect();
    let seen: Vec<Vec<f32>> = t
        .with_output_weights(|t| Ok(t.opt.params.iter().map(|p| flat(p.as_tensor())).collect()))
        .unwrap();
    for (i, s) in seen.iter().enumerate() {
        assert_eq!(s, &flat(&t.ema.as_ref().unwrap().shadow[i]));
    }
    let after: Vec<Vec<f32>> = t.opt.params.iter().map(|p| flat(p.as_tensor())).collect();
    assert_eq!(before, after);
    // The LoRA file written holds the EMA weights, not the current ones
    // (regression: its tensors once shared the variables' storage, so
    // putting the current weights back changed the file before it was saved).
    if !t.cfg.full {
        t.save_output().unwrap();
        let file = selma_lora::LoraFile::load(&t.cfg.out, &candle_core::Device::Cpu).unwrap();
        let shadow = &t.ema.as_ref().unwrap().shadow;
        for (i, name) in t.names.iter().enumerate() {
            let (path, ab) = name.rsplit_once('.').unwrap();
            let l = &file.layers[&format!("unet.{path}")];
            let got = if ab == "lora_A" { &l.down } else { &l.up };
            assert_eq!(
                flat(got),
                flat(&shadow[i]),
                "{name} in the file is not the EMA"
            );
        }
    }
}

#[test]
fn ema_equals_a_hand_computed_average_in_full_and_lora_mode() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = full_config(dir.path(), "ema-full");
    cfg.ema_decay = 0.7;
    cfg.ema_warmup = false;
    check_ema(cfg, 4);
    let mut cfg = full_config(dir.path(), "ema-lora.safetensors");
    cfg.full = false;
    cfg.lr = 1e-2;
    cfg.ema_decay = 0.8;
    cfg.ema_warmup = true;
    check_ema(cfg, 6);
}

#[test]
fn written_folder_loads_and_renders_like_the_trained_weights() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = full_config(dir.path(), "model-out");
    cfg.steps = 4;
    cfg.lr = 1e-2;
    cfg.ema_decay = 0.5;
    cfg.save_every = 0;
    let mut t = Trainer::new(cfg.clone()).unwrap();
    t.run(|_| {}).unwrap();
    let prompt = "a checkered pattern number 1";
    let in_memory = t.with_output_model(|sd| Ok(render(sd, prompt))).unwrap();
    let out = &cfg.out;
    for f in [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "vae/config.json",
        "scheduler/scheduler_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing from the output");
    }
    let loaded = StableDiffusion::load(out, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(render(&loaded, prompt), in_memory);
    let base = StableDiffusion::load(&cfg.model, &Device::Cpu, DType::F32).unwrap();
    assert_ne!(render(&base, prompt), in_memory, "training changed nothing");
    // The stored UNet weights are the EMA averages.
    let w = candle_core::safetensors::load(
        out.join("unet/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let i = t
        .names
        .iter()
        .position(|n| n == "unet.conv_in.weight")
        .unwrap();
    assert_eq!(
        flat(&w["conv_in.weight"]),
        flat(&t.ema.as_ref().unwrap().shadow[i])
    );
    // Writing again replaces the previous output; the base folder is refused.
    t.save_output().unwrap();
    let mut bad = cfg.clone();
    bad.out = cfg.model.clone();
    let mut tb = Trainer::new(bad).unwrap();
    let e = format!("{:#}", tb.save_output().unwrap_err());
    assert!(e.contains("base model"), "{e}");
}

#[test]
fn frozen_text_encoder_in_full_mode_uses_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = full_config(dir.path(), "unet-only");
    cfg.train_text_encoder = Some(false);
    cfg.steps = 2;
    cfg.save_every = 0;
    let mut t = Trainer::new(cfg.clone()).unwrap();
    assert_eq!(t.full.len(), 1);
    t.run(|_| {}).unwrap();
    assert!(t.text_encoder_calls <= 3);
    assert!(cfg.run_dir().join("text-cache").is_dir());
    // The text encoder is copied unchanged.
    let a = std::fs::read(cfg.model.join("text_encoder/model.safetensors")).unwrap();
    let b = std::fs::read(cfg.out.join("text_encoder/model.safetensors")).unwrap();
    assert!(a == b);
}
