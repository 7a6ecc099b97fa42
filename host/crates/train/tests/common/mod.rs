//! Shared fixtures: a tiny random model and a small image-caption dataset.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use selma_diffusion::init::{init_model, Preset};
use selma_train::trainer::TrainConfig;

/// Writes the tiny model to `dir/tiny` and returns its path.
pub fn tiny_model(dir: &Path) -> PathBuf {
    let m = dir.join("tiny");
    init_model(Preset::Tiny, &m, 11).unwrap();
    m
}

/// Writes `n` 80x64 PNGs with metadata.jsonl to `dir/data`.
pub fn dataset(dir: &Path, n: u32) -> PathBuf {
    let d = dir.join("data");
    std::fs::create_dir_all(&d).unwrap();
    let mut meta = String::new();
    for i in 0..n {
        let img = image::RgbImage::from_fn(80, 64, |x, y| {
            image::Rgb([
                (x * 3 + i * 50) as u8,
                (y * 4) as u8,
                if (x / 8 + y / 8 + i) % 2 == 0 {
                    230
                } else {
                    20
                },
            ])
        });
        let name = format!("img{i}.png");
        img.save(d.join(&name)).unwrap();
        meta.push_str(&format!(
            "{{\"file_name\": \"{name}\", \"text\": \"a checkered pattern number {i}\"}}\n"
        ));
    }
    std::fs::write(d.join("metadata.jsonl"), meta).unwrap();
    d
}

/// `small_config` in `dir` writing `dir/out`, making the tiny model and a
/// 3-image dataset there on first use.
pub fn config_in(dir: &Path, out: &str) -> TrainConfig {
    let model = dir.join("tiny");
    if !model.is_dir() {
        tiny_model(dir);
    }
    let data = dir.join("data");
    if !data.is_dir() {
        dataset(dir, 3);
    }
    small_config(&model, &data, &dir.join(out))
}

/// Renders one 64x64 image (DDIM 4 steps, guidance 2, seed `seed`): the
/// fixture renders that trained and loaded models are compared by.
pub fn render(sd: &selma_diffusion::pipeline::StableDiffusion, prompt: &str, seed: u64) -> Vec<u8> {
    use selma_diffusion::pipeline::{GenerateRequest, InitNoise};
    use selma_diffusion::scheduler::{SamplerOptions, SchedulerKind};
    let req = GenerateRequest {
        prompt: prompt.into(),
        negative: String::new(),
        steps: 4,
        guidance: 2.0,
        scheduler: SchedulerKind::Ddim,
        sampler: SamplerOptions::default(),
        width: 64,
        height: 64,
        batch: 1,
        init: InitNoise::Seed(seed),
        noise_seed: 0,
    };
    sd.generate(&req, &mut |_, _| {}).unwrap().remove(0).pixels
}

/// A small, fast configuration on the tiny model.
pub fn small_config(model: &Path, data: &Path, out: &Path) -> TrainConfig {
    TrainConfig {
        model: model.to_path_buf(),
        data: data.to_path_buf(),
        out: out.to_path_buf(),
        rank: 4,
        alpha: 4.0,
        steps: 20,
        batch: 2,
        grad_accum: 2,
        lr: 1e-3,
        resolution: 64,
        seed: 3,
        save_every: 10,
        crop: selma_train::dataset::Crop::Random,
        random_flip: true,
        noise_offset: 0.05,
        min_snr_gamma: Some(5.0),
        ..TrainConfig::default()
    }
}

/// The tiny model turned into a pixel-space one, like the ShapeWorld base:
/// the lossless pixel-unshuffle codec (factor 2: 16x16x3 images are 8x8x12
/// latents), the UNet's conv_in/conv_out re-initialised for 12 channels,
/// v-prediction on the cosine schedule. Generated images are then exactly the
/// sampled latents, so pixel distances measure the model itself.
pub fn tiny_pixel_model(dir: &Path) -> PathBuf {
    use selma_diffusion::init::{
        init_values, shapeworld_codec_config, shapeworld_scheduler_config,
    };
    let m = dir.join("tiny-pixel");
    init_model(Preset::Tiny, &m, 11).unwrap();
    let write = |p: &str, v: &serde_json::Value| {
        std::fs::write(m.join(p), serde_json::to_string_pretty(v).unwrap()).unwrap()
    };
    let read = |p: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(m.join(p)).unwrap()).unwrap()
    };
    let mut codec = shapeworld_codec_config();
    codec["sample_size"] = 16.into();
    write("vae/config.json", &codec);
    std::fs::remove_file(m.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    let mut index = read("model_index.json");
    index["vae"] = serde_json::json!(["selma", codec["_class_name"]]);
    write("model_index.json", &index);
    write(
        "scheduler/scheduler_config.json",
        &shapeworld_scheduler_config(),
    );
    let mut unet = read("unet/config.json");
    unet["in_channels"] = 12.into();
    unet["out_channels"] = 12.into();
    write("unet/config.json", &unet);
    let wf = m.join("unet/diffusion_pytorch_model.safetensors");
    let mut w = candle_core::safetensors::load(&wf, &candle_core::Device::Cpu).unwrap();
    for (name, shape) in [
        ("conv_in.weight", vec![32, 12, 3, 3]),
        ("conv_out.weight", vec![12, 32, 3, 3]),
        ("conv_out.bias", vec![12]),
    ] {
        let v = init_values(name, &shape, 11);
        let t = candle_core::Tensor::from_vec(v, shape, &candle_core::Device::Cpu).unwrap();
        w.insert(name.to_string(), t);
    }
    candle_core::safetensors::save(&w, &wf).unwrap();
    m
}

/// Two 16x16 training images with distinct captions (halves of two colours).
pub fn pixel_dataset(dir: &Path) -> PathBuf {
    let d = dir.join("pixel-data");
    std::fs::create_dir_all(&d).unwrap();
    let pics: [(&str, [u8; 3], [u8; 3], bool); 2] = [
        ("red left blue right", [220, 40, 40], [40, 80, 220], true),
        ("yellow above green", [230, 200, 40], [40, 170, 60], false),
    ];
    let mut meta = String::new();
    for (i, (text, a, b, vertical)) in pics.iter().enumerate() {
        let img = image::RgbImage::from_fn(16, 16, |x, y| {
            let first = if *vertical { x < 8 } else { y < 8 };
            image::Rgb(if first { *a } else { *b })
        });
        let name = format!("p{i}.png");
        img.save(d.join(&name)).unwrap();
        meta.push_str(&format!(
            "{{\"file_name\": \"{name}\", \"text\": \"{text}\"}}\n"
        ));
    }
    std::fs::write(d.join("metadata.jsonl"), meta).unwrap();
    d
}
