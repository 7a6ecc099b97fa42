//! The pixel-unshuffle codec and the `shapeworld` preset: the codec round
//! trips 8-bit images exactly and loads from a model folder (its class
//! checked against model_index.json), and a random shapeworld model loads
//! completely, has the recipe's parameter count, tokenizes every ShapeWorld
//! word to one token and generates 32x32 images whose pixels are exactly the
//! pixel-shuffled latents.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use selma_diffusion::codec::{pixel_shuffle, Vae};
use selma_diffusion::init::{
    init_model, init_model_with_vocabulary, Preset, SHAPEWORLD_MAX_TOKENS,
};
use selma_diffusion::pipeline::{GenerateRequest, InitNoise, StableDiffusion};
use selma_diffusion::scheduler::{GaussianRng, PredictionType, SamplerOptions, SchedulerKind};
use selma_diffusion::vae::to_rgb8;

/// Captions in the ShapeWorld style; their words are the test's vocabulary
/// (the real one lives in selma-shapeworld, checked by tests/shapeworld_model.rs).
const CAPTIONS: [&str; 4] = [
    "a red circle and a green square",
    "three blue triangles",
    "a yellow triangle left of a green square",
    "two red squares above a blue circle",
];

fn words() -> Vec<&'static str> {
    let mut w: Vec<&str> = CAPTIONS.iter().flat_map(|c| c.split(' ')).collect();
    w.sort_unstable();
    w.dedup();
    w
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// 32x32 RGB8 bytes from the seeded generator.
fn random_image(seed: u64) -> Vec<u8> {
    let mut rng = GaussianRng::new(seed);
    (0..32 * 32 * 3)
        .map(|_| ((rng.normal() * 80.0 + 128.0).clamp(0.0, 255.0)) as u8)
        .collect()
}

/// RGB8 HWC bytes -> `[1, 3, H, W]` in [-1, 1], as the trainer prepares images.
fn to_tensor(px: &[u8], h: usize, w: usize) -> Tensor {
    let v: Vec<f32> = px.iter().map(|&p| p as f32 / 127.5 - 1.0).collect();
    Tensor::from_vec(v, (h, w, 3), &Device::Cpu)
        .unwrap()
        .permute((2, 0, 1))
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

#[test]
fn pixel_unshuffle_codec_loads_and_round_trips_losslessly() {
    let tmp = tempfile::tempdir().unwrap();
    let vae_dir = tmp.path().join("vae");
    write(
        &vae_dir.join("config.json"),
        r#"{"_class_name": "PixelUnshuffle", "factor": 2, "in_channels": 3, "scaling_factor": 1.0}"#,
    );
    let vae = Vae::load_dir(&vae_dir, DType::F16, &Device::Cpu).unwrap();
    assert_eq!(vae.class_name(), "PixelUnshuffle");
    assert_eq!(vae.downscale(), 2);
    assert_eq!(vae.latent_channels(), 12);
    for seed in 0..3 {
        let px = random_image(seed);
        let img = to_tensor(&px, 32, 32);
        let post = vae.encode(&img.to_dtype(vae.dtype()).unwrap()).unwrap();
        assert_eq!(post.mean.dims(), &[1, 12, 16, 16]);
        // a point mass: the trainer's `mean + std * z` is the mean itself
        let std_max = post
            .std()
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(std_max, 0.0);
        // latent (c*4 + i*2 + j, y, x) is pixel (2y + i, 2x + j) of channel c
        let mean = post.mean.get(0).unwrap().to_vec3::<f32>().unwrap();
        for (c, i, j, y, x) in [(0, 0, 0, 0, 0), (1, 1, 0, 3, 7), (2, 1, 1, 15, 15)] {
            let p = px[((2 * y + i) * 32 + 2 * x + j) * 3 + c];
            assert_eq!(mean[c * 4 + i * 2 + j][y][x], p as f32 / 127.5 - 1.0);
        }
        let lat = vae.scale_latents(&post.mean).unwrap();
        let back = to_rgb8(&vae.decode_latents(&lat).unwrap()).unwrap();
        assert_eq!(back[0], px, "seed {seed}: round trip must be exact");
    }
    // unknown classes and inconsistent channel counts name the file
    write(
        &vae_dir.join("config.json"),
        r#"{"_class_name": "AutoencoderTiny"}"#,
    );
    let e = format!(
        "{:#}",
        Vae::load_dir(&vae_dir, DType::F32, &Device::Cpu).unwrap_err()
    );
    assert!(
        e.contains("AutoencoderTiny") && e.contains("config.json"),
        "{e}"
    );
    write(
        &vae_dir.join("config.json"),
        r#"{"_class_name": "PixelUnshuffle", "factor": 2, "latent_channels": 4}"#,
    );
    let e = format!(
        "{:#}",
        Vae::load_dir(&vae_dir, DType::F32, &Device::Cpu).unwrap_err()
    );
    assert!(e.contains("latent_channels"), "{e}");
}

#[test]
fn shapeworld_preset_loads_tokenizes_and_generates() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sw");
    let vocabulary = words();
    // the preset needs its vocabulary
    assert!(init_model(Preset::Shapeworld, &dir, 7).is_err());
    let summary = init_model_with_vocabulary(Preset::Shapeworld, &dir, 7, &vocabulary).unwrap();
    let count = |part: &str| {
        summary
            .params
            .iter()
            .find(|(p, _)| p == part)
            .map(|(_, n)| *n)
    };
    // SHAPEWORLD.md: the same architecture in diffusers has 6.6M UNet parameters
    let unet = count("unet").unwrap();
    assert!((6_550_000..6_650_000).contains(&unet), "unet has {unet}");
    assert_eq!(count("vae"), None, "the codec has no weights");
    assert!(!dir.join("vae/diffusion_pytorch_model.safetensors").exists());

    // load() checks every weight file is consumed completely
    let sd = StableDiffusion::load(&dir, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(sd.vae.class_name(), "PixelUnshuffle");
    assert_eq!(sd.vae_scale(), 2);
    assert_eq!(sd.unet.config().in_channels, 12);
    assert_eq!(
        sd.scheduler_config.prediction_type,
        PredictionType::VPrediction
    );

    let tok = &sd.tokenizer;
    assert_eq!(tok.max_len(), SHAPEWORLD_MAX_TOKENS);
    let mut ids = std::collections::BTreeSet::new();
    for &w in &vocabulary {
        let t = tok.encode(w).unwrap();
        assert_eq!(t.len(), 1, "{w:?} -> {t:?}");
        assert_eq!(tok.decode(&t).trim(), w);
        ids.insert(t[0]);
    }
    assert_eq!(ids.len(), vocabulary.len(), "distinct tokens");
    // the longest caption form fits without truncation
    let long = "a yellow triangle left of a green square";
    assert_eq!(tok.encode(long).unwrap().len(), 8);
    assert_eq!(tok.truncated_tokens(long).unwrap(), 0);
    // words outside the vocabulary still encode, byte-level
    assert!(tok.encode("purple hexagon").unwrap().len() > 2);

    let req = GenerateRequest {
        prompt: "three red circles".into(),
        negative: String::new(),
        steps: 3,
        guidance: 1.5,
        scheduler: SchedulerKind::Ddim,
        sampler: SamplerOptions::default(),
        width: 32,
        height: 32,
        batch: 2,
        init: InitNoise::Seed(5),
        noise_seed: 0,
    };
    let images = sd.generate(&req, &mut |_, _| {}).unwrap();
    assert_eq!(images.len(), 2);
    assert_eq!((images[0].width, images[0].height), (32, 32));
    assert_eq!(images[0].pixels.len(), 32 * 32 * 3);
    assert_ne!(images[0].pixels, images[1].pixels, "seeds 5 and 6 differ");
    // the image is the pixel-shuffled latents (scaling 1), independently decoded
    let lat = sd.sample_latents(&req, &mut |_, _| {}).unwrap();
    assert_eq!(lat.dims(), &[2, 12, 16, 16]);
    let want = to_rgb8(&pixel_shuffle(&lat, 2).unwrap()).unwrap();
    assert_eq!(images[0].pixels, want[0]);
    assert_eq!(images[1].pixels, want[1]);
}

#[test]
fn codec_class_must_agree_with_model_index() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sw");
    init_model_with_vocabulary(Preset::Shapeworld, &dir, 0, &words()).unwrap();
    let idx = dir.join("model_index.json");
    let text = std::fs::read_to_string(&idx).unwrap();
    assert!(text.contains("PixelUnshuffle"), "{text}");
    std::fs::write(&idx, text.replace("PixelUnshuffle", "AutoencoderKL")).unwrap();
    let e = match StableDiffusion::load(&dir, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("a mismatched codec entry must not load"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        e.contains("model_index.json") && e.contains("PixelUnshuffle"),
        "{e}"
    );
}
