//! Self-generated training data for ShapeWorld experiments: a model renders
//! a prompt list in batches (the `render`er), the verifier judges each
//! image, and the images go into a dataset folder (`NNNNN.png` +
//! `metadata.jsonl` with `file_name`, `text`, `seed`, `score`, `keep`) that
//! `selma train --data` reads; optionally only the images that pass.

use super::render::{Renderer, SampleSettings};
use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device};
use selma_diffusion::pipeline::StableDiffusion;
use selma_runtime::{Runtime, RuntimeConfig};
use serde::Serialize;
use std::path::Path;

/// What a self-generation run produced.
#[derive(Debug, Clone, PartialEq)]
pub struct SelfGenSummary {
    /// Images rendered.
    pub rendered: usize,
    /// Images the verifier passed.
    pub passed: usize,
    /// Images written to the folder.
    pub written: usize,
}

#[derive(Serialize)]
struct Line<'a> {
    file_name: String,
    text: &'a str,
    seed: u64,
    score: f32,
    keep: bool,
}

/// Render `prompts[i]` from noise seeded `seed + i`, judge each image with
/// `verifier`, and write the dataset folder `out` (created; must not hold a
/// metadata.jsonl). With `only_passing`, rejected images are not written.
#[allow(clippy::too_many_arguments)]
pub fn self_generate(
    model: &Path,
    device: &Device,
    prompts: &[String],
    seed: u64,
    sample: &SampleSettings,
    batch: usize,
    verifier: &str,
    only_passing: bool,
    out: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<SelfGenSummary> {
    ensure!(batch >= 1, "--batch must be >= 1");
    ensure!(
        !out.join("metadata.jsonl").exists(),
        "{} already holds a dataset (metadata.jsonl); choose a new --out folder",
        out.display()
    );
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let sd = StableDiffusion::load(model, device, DType::F32)
        .with_context(|| format!("loading model folder {}", model.display()))?;
    let mut r = Renderer::new(sd)?;
    let rt = Runtime::new(RuntimeConfig {
        log_to_stderr: false,
        ..RuntimeConfig::default()
    })?;
    let mut v = rt
        .image_filter(verifier)
        .with_context(|| format!("loading the verifier plugin {verifier:?}"))?;
    let params = v.default_params();
    let mut text = String::new();
    let (mut passed, mut written) = (0, 0);
    progress(0, prompts.len());
    for (c, chunk) in prompts.chunks(batch).enumerate() {
        let p: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let seeds: Vec<u64> = (0..chunk.len())
            .map(|k| seed.wrapping_add((c * batch + k) as u64))
            .collect();
        let images = r.render(&p, &seeds, sample)?;
        for (k, img) in images.iter().enumerate() {
            let i = c * batch + k;
            let verdict = v.check(
                &selma_runtime::RgbImage {
                    width: img.width as u32,
                    height: img.height as u32,
                    pixels: img.pixels.clone(),
                    non_finite: 0.0,
                },
                p[k],
                &params,
            )?;
            passed += verdict.keep as usize;
            if only_passing && !verdict.keep {
                continue;
            }
            let file_name = format!("{i:05}.png");
            let params_text = format!("{}\nSteps: {}, Seed: {}", p[k], sample.steps, seeds[k]);
            selma_diffusion::image_io::write_png(
                &out.join(&file_name),
                img.width,
                img.height,
                &img.pixels,
                &params_text,
            )?;
            text.push_str(&serde_json::to_string(&Line {
                file_name,
                text: p[k],
                seed: seeds[k],
                score: verdict.score,
                keep: verdict.keep,
            })?);
            text.push('\n');
            written += 1;
        }
        progress((c * batch + chunk.len()).min(prompts.len()), prompts.len());
    }
    selma_io::write_atomic(&out.join("metadata.jsonl"), text.as_bytes())?;
    Ok(SelfGenSummary {
        rendered: prompts.len(),
        passed,
        written,
    })
}
