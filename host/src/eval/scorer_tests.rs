//! Tests of the scorers (degenerate plugin, CLIPScore on a tiny random CLIP)
//! and of CLIP's config parsing and preprocessing.

use super::clip::{self, init_tiny_clip, preprocess, CLIP_MEAN, CLIP_STD};
use super::scorer::{cosine, ClipScorer, ImageFilterScorer, Scorer};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::clip::ClipModel;
use selma_runtime::{RgbImage, Runtime, RuntimeConfig};

fn image(w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> RgbImage {
    let pixels = (0..w * h).flat_map(|i| f(i % w, i / w)).collect();
    RgbImage {
        width: w,
        height: h,
        pixels,
        non_finite: 0.0,
    }
}

fn checker(w: u32, h: u32, a: u8, b: u8) -> RgbImage {
    image(w, h, |x, y| if (x + y) % 2 == 0 { [a; 3] } else { [b; 3] })
}

#[test]
fn degenerate_plugin_scores_flat_low_and_texture_high() {
    let cache = tempfile::tempdir().unwrap();
    let rt = Runtime::new(RuntimeConfig {
        cache_dir: Some(cache.path().to_path_buf()),
        log_to_stderr: false,
        ..Default::default()
    })
    .unwrap();
    let plugin = rt.image_filter("degenerate").unwrap();
    let params = plugin.default_params();
    let mut s = ImageFilterScorer::new(plugin, params);
    assert_eq!(s.name(), "degenerate");
    // score = min(1, mean channel std / 64): flat 0, 0/255 checker (std
    // 127.5) 1, 100/132 checker (std 16) 0.25
    let flat = s
        .score(&image(16, 16, |_, _| [128, 128, 128]), "a cat")
        .unwrap();
    let strong = s.score(&checker(16, 16, 0, 255), "a cat").unwrap();
    let mild = s.score(&checker(16, 16, 100, 132), "a cat").unwrap();
    assert_eq!(flat, 0.0);
    assert_eq!(strong, 1.0);
    assert!((mild - 0.25).abs() < 1e-6, "{mild}");
    // a malformed image is refused with the plugin's name in the error
    let mut bad = checker(4, 4, 0, 255);
    bad.pixels.pop();
    let e = format!("{:#}", s.score(&bad, "a cat").unwrap_err());
    assert!(e.contains("degenerate"), "{e}");
}

#[test]
fn tiny_clip_same_seed_same_bytes() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    init_tiny_clip(a.path(), 3).unwrap();
    init_tiny_clip(b.path(), 3).unwrap();
    init_tiny_clip(c.path(), 4).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "vocab.json",
        "merges.txt",
    ] {
        let x = std::fs::read(a.path().join(f)).unwrap();
        assert_eq!(x, std::fs::read(b.path().join(f)).unwrap(), "{f}");
        let same = x == std::fs::read(c.path().join(f)).unwrap();
        assert_eq!(same, f != "model.safetensors", "{f} vs another seed");
    }
}

#[test]
fn clip_config_is_read_from_the_hf_layout() {
    let dir = tempfile::tempdir().unwrap();
    init_tiny_clip(dir.path(), 0).unwrap();
    let cfg = clip::read_config(dir.path()).unwrap();
    assert_eq!(cfg.image_size, 32);
    assert_eq!(cfg.vision_config.patch_size, 8);
    assert_eq!(cfg.text_config.embed_dim, 32);
    assert_eq!(cfg.text_config.projection_dim, 16);
    // unsupported activation and missing folders name the problem
    let p = dir.path().join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["text_config"]["hidden_act"] = "gelu".into();
    let e = format!("{:#}", clip::parse_config(&v, &p).unwrap_err());
    assert!(
        e.contains("text_config.hidden_act") && e.contains("config.json"),
        "{e}"
    );
    v["text_config"]["hidden_act"] = "quick_gelu".into();
    v["vision_config"]["patch_size"] = 5.into();
    let e = format!("{:#}", clip::parse_config(&v, &p).unwrap_err());
    assert!(e.contains("patch_size"), "{e}");
    let e = format!(
        "{:#}",
        ClipScorer::load(&dir.path().join("nope"), &Device::Cpu)
            .err()
            .unwrap()
    );
    assert!(e.contains("nope") && e.contains("config.json"), "{e}");
}

#[test]
fn preprocess_normalises_and_centre_crops() {
    let dev = Device::Cpu;
    let norm = |v: u8, c: usize| (v as f32 / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c];
    // square at the model size: no resampling, per-pixel normalisation
    let img = image(8, 8, |x, y| [(x * 30) as u8, (y * 30) as u8, 77]);
    let t = preprocess(&img, 8, &dev).unwrap();
    assert_eq!(t.dims(), &[1, 3, 8, 8]);
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for y in 0..8 {
        for x in 0..8 {
            let want = [
                norm((x * 30) as u8, 0),
                norm((y * 30) as u8, 1),
                norm(77, 2),
            ];
            for c in 0..3 {
                let got = v[c * 64 + y * 8 + x];
                assert!(
                    (got - want[c]).abs() < 1e-6,
                    "({x},{y},{c}) {got} vs {}",
                    want[c]
                );
            }
        }
    }
    // 16x8: the shorter side already fits; the centre 8x8 (x in 4..12) is kept
    let wide = image(16, 8, |x, _| match x {
        0..4 => [255, 0, 0],
        4..12 => [0, 255, 0],
        _ => [0, 0, 255],
    });
    let v = preprocess(&wide, 8, &dev)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (i, got) in v.iter().enumerate() {
        let c = i / 64;
        let want = norm(if c == 1 { 255 } else { 0 }, c);
        assert!((got - want).abs() < 1e-6, "{i}");
    }
    // a tall flat image resampled down stays flat
    let tall = image(20, 40, |_, _| [10, 200, 90]);
    let v = preprocess(&tall, 8, &dev)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (i, got) in v.iter().enumerate() {
        let c = i / 64;
        let want = norm([10, 200, 90][c], c);
        assert!((got - want).abs() < 1e-6, "{i}");
    }
}

fn test_images() -> Vec<RgbImage> {
    vec![
        checker(32, 32, 0, 255),
        image(48, 32, |x, y| [(x * 5) as u8, (y * 7) as u8, 200]),
        image(32, 64, |x, y| [((x * y) % 256) as u8, 30, (y * 3) as u8]),
        image(32, 32, |_, _| [128, 128, 128]),
    ]
}

const PROMPTS: [&str; 3] = [
    "three red apples on a wooden table",
    "a dog to the left of a cat",
    "an astronaut riding a horse on the moon",
];

#[test]
fn clip_scores_are_in_range_and_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    init_tiny_clip(dir.path(), 11).unwrap();
    let mut s = ClipScorer::load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(s.name(), "clipscore");
    let mut fresh = ClipScorer::load(dir.path(), &Device::Cpu).unwrap();
    let mut cosines = vec![];
    for img in test_images() {
        for p in PROMPTS {
            let a = s.score(&img, p).unwrap();
            assert!((0.0..=100.0).contains(&a), "{a}");
            // same inputs, same score (cached text features and a new scorer)
            assert_eq!(a, s.score(&img, p).unwrap());
            assert_eq!(a, fresh.score(&img, p).unwrap());
            let c = s.cosine(&img, p).unwrap();
            assert!((-1.0..=1.0).contains(&c));
            assert_eq!(a, 100.0 * c.max(0.0));
            cosines.push(c);
        }
    }
    // the scores depend on the inputs
    cosines.sort_by(f64::total_cmp);
    cosines.dedup();
    assert!(cosines.len() > 6, "{cosines:?}");
}

/// The score against candle-transformers' own ClipModel (argmax pooling,
/// its projections), normalised by hand: an independent path to 100 * cos.
#[test]
fn clip_score_matches_clip_model_features() {
    let dir = tempfile::tempdir().unwrap();
    init_tiny_clip(dir.path(), 5).unwrap();
    let dev = Device::Cpu;
    let mut s = ClipScorer::load(dir.path(), &dev).unwrap();
    let cfg = clip::read_config(dir.path()).unwrap();
    let tensors =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &dev).unwrap();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
    let model = ClipModel::new(vb, &cfg).unwrap();
    let tok = selma_diffusion::tokenizer::ClipTokenizer::from_dir(dir.path()).unwrap();
    let mut checked_positive = 0;
    for img in test_images() {
        let px = preprocess(&img, cfg.image_size, &dev).unwrap();
        let fi = model
            .get_image_features(&px)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for p in PROMPTS {
            let mut ids = vec![tok.bos_id()];
            ids.extend(tok.encode(p).unwrap());
            ids.push(tok.eos_id());
            assert_eq!(ids, s.token_ids(p).unwrap());
            let t = Tensor::new(ids.as_slice(), &dev)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let ft = model
                .get_text_features(&t)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let ni = fi.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            let nt = ft.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            let dot: f64 = fi.iter().zip(&ft).map(|(a, b)| *a as f64 * *b as f64).sum();
            let want_cos = dot / (ni * nt);
            let got_cos = s.cosine(&img, p).unwrap();
            assert!((got_cos - want_cos).abs() < 1e-4, "{got_cos} vs {want_cos}");
            let got = s.score(&img, p).unwrap();
            assert!(
                (got - 100.0 * want_cos.max(0.0)).abs() < 1e-2,
                "{got} vs {want_cos}"
            );
            if want_cos > 0.0 {
                checked_positive += 1;
            }
        }
    }
    // random weights: expect both clipped and unclipped cases among 12 pairs
    assert!(checked_positive > 0, "no positive cosine among the pairs");
}

#[test]
fn cosine_by_hand() {
    assert!((cosine(&[1.0, 0.0], &[1.0, 1.0]) - 0.5f64.sqrt()).abs() < 1e-12);
    assert_eq!(cosine(&[1.0, 2.0], &[-2.0, 1.0]), 0.0);
    assert_eq!(cosine(&[0.0, 0.0], &[1.0, 1.0]), 0.0);
    assert!((cosine(&[3.0, 4.0], &[-3.0, -4.0]) + 1.0).abs() < 1e-12);
}
