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
