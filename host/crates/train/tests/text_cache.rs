//! Text embeddings while the text encoder is frozen: cached on disk (one
//! file per caption, keyed by caption and text-encoder identity); a second
//! run reads the cache (no encoder call) and trains bit-identically. Batched
//! in-graph encoding equals the pipeline's per-caption encoding; caption
//! dropout trains on the empty caption.

use crate::common;

use std::collections::HashMap;

use candle_core::Tensor;
use selma_train::trainer::{encode_batch, Trainer};

fn bits(m: &HashMap<String, Tensor>) -> Vec<(String, Vec<u32>)> {
    let mut v: Vec<_> = m
        .iter()
        .map(|(k, t)| {
            let x: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            (k.clone(), x.iter().map(|f| f.to_bits()).collect())
        })
        .collect();
    v.sort();
    v
}

fn cache_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|r| {
            r.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn second_run_reads_the_text_cache_and_trains_identically() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(dir.path());
    let data = common::dataset(dir.path(), 3);
    let mut cfg = common::small_config(&model, &data, &dir.path().join("e.safetensors"));
    cfg.steps = 4;
    cfg.save_every = 0;
    let cache = cfg.run_dir().join("text-cache");

    let mut a = Trainer::new(cfg.clone()).unwrap();
    a.run(|_| {}).unwrap();
    // 4 updates x 2 micro-batches x 2 images = 16 draws over 3 captions.
    assert_eq!(a.text_encoder_calls, 3);
    assert_eq!(cache_files(&cache), 3);
    let first = a.state_tensors();
    drop(a);

    let mut b = Trainer::new(cfg.clone()).unwrap();
    b.run(|_| {}).unwrap();
    assert_eq!(b.text_encoder_calls, 0, "the second run encoded captions");
    assert_eq!(cache_files(&cache), 3);
    assert!(bits(&first) == bits(&b.state_tensors()));

    // Another text encoder (other weights) does not hit the old entries.
    let model2 = dir.path().join("tiny2");
    selma_diffusion::init::init_model(selma_diffusion::init::Preset::Tiny, &model2, 12).unwrap();
    let mut cfg2 = cfg.clone();
    cfg2.model = model2;
    cfg2.steps = 1;
    cfg2.grad_accum = 1;
    let mut c = Trainer::new(cfg2).unwrap();
    c.run(|_| {}).unwrap();
    assert!(c.text_encoder_calls > 0);
    assert!(cache_files(&cache) > 3);
}

#[test]
fn batched_encoding_equals_the_pipeline_encoding() {
    let dir = tempfile::tempdir().unwrap();
    for preset in [
        selma_diffusion::init::Preset::Tiny,
        selma_diffusion::init::Preset::TinyXl,
    ] {
        let m = dir.path().join(format!("{preset:?}"));
        selma_diffusion::init::init_model(preset, &m, 3).unwrap();
        let sd = selma_diffusion::pipeline::StableDiffusion::load(
            &m,
            &candle_core::Device::Cpu,
            candle_core::DType::F32,
        )
        .unwrap();
        let texts = vec![
            "a red circle".to_string(),
            String::new(),
            "two blue squares left of a cat".to_string(),
        ];
        let (ctx, pooled) = encode_batch(&sd, &texts).unwrap();
        for (i, t) in texts.iter().enumerate() {
            let (c, p) = sd.encode_text(t).unwrap();
            let d = (ctx.narrow(0, i, 1).unwrap() - c)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-5, "{preset:?} caption {i}: {d}");
            assert_eq!(pooled.is_some(), p.is_some());
            if let (Some(a), Some(b)) = (&pooled, p) {
                let d = (a.narrow(0, i, 1).unwrap() - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(d < 1e-5, "{preset:?} pooled {i}: {d}");
            }
        }
    }
}

#[test]
fn caption_dropout_one_trains_on_the_empty_caption_only() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(dir.path());
    let data = common::dataset(dir.path(), 3);
    let mut cfg = common::small_config(&model, &data, &dir.path().join("d.safetensors"));
    cfg.steps = 2;
    cfg.save_every = 0;
    cfg.caption_dropout = 1.0;
    let mut t = Trainer::new(cfg.clone()).unwrap();
    t.run(|_| {}).unwrap();
    assert_eq!(t.text_encoder_calls, 1, "only the empty caption is encoded");
    assert_eq!(cache_files(&cfg.run_dir().join("text-cache")), 1);
    let mut bad = cfg.clone();
    bad.caption_dropout = 1.5;
    let e = format!("{:#}", Trainer::new(bad).err().unwrap());
    assert!(e.contains("caption-dropout"), "{e}");
}
