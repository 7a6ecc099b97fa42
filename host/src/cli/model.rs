//! `selma model`: create random model folders in the diffusers layout
//! (`init`), summarise existing ones (`info`) and change the storage dtype
//! of their weights (`convert`).

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Args, Subcommand};
use selma_diffusion::init::{build_folder_atomically, init_model_with_vocabulary, Preset};
use selma_diffusion::weights::{SafetensorsSource, TensorSource};
use selma_shapeworld::caption::VOCABULARY;
use std::collections::HashMap;
use std::path::Path;
use std::path::PathBuf;

/// Create or inspect model folders.
#[derive(Subcommand, Debug)]
pub enum ModelCommand {
    /// Write a random model in the exact diffusers layout (configs included).
    ///
    /// `tiny`: a few-MB SD 1.x-style model with every block type (64x64 images,
    /// fast on CPU) for tests and demos. `tiny-xl`: the same for SDXL.
    /// `sd15-random`: the SD 1.5 architecture with random f16 weights (~2 GB)
    /// for GPU checks and timings. `shapeworld`: the ShapeWorld base
    /// architecture (32x32 images, pixel-unshuffle codec, 6.6M-parameter UNet,
    /// 2-layer text encoder, every ShapeWorld word one token, v-prediction on
    /// the cosine schedule), the starting point of `selma train --full`.
    /// The same preset and seed give the same bytes.
    Init(InitArgs),
    /// Print a model folder's pipeline class, parts and parameter counts.
    Info(InfoArgs),
    /// Copy a model folder, storing every floating-point weight in another
    /// dtype (e.g. f16 for a small shipped model; loading converts back).
    Convert(ConvertArgs),
}

/// Arguments of `selma model convert`.
#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// Diffusers model folder to read.
    pub dir: PathBuf,
    /// Folder to create (must not exist, or be empty).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Storage dtype of the weights: f32, f16 or bf16.
    #[arg(long, default_value = "f16")]
    pub dtype: String,
}

/// Arguments of `selma model init`.
#[derive(Args, Debug)]
pub struct InitArgs {
    /// tiny, tiny-xl, sd15-random or shapeworld.
    #[arg(long, default_value = "tiny")]
    pub preset: Preset,
    /// Folder to create (must not exist, or be empty).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Arguments of `selma model info`.
#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Diffusers model folder.
    pub dir: PathBuf,
}

/// The class of a weightless codec folder (its config names a class that has
/// no weights, e.g. `PixelUnshuffle`).
fn weightless_codec(dir: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let class = selma_diffusion::codec::codec_class(&v);
    (class == selma_diffusion::codec::PIXEL_UNSHUFFLE).then_some(class)
}

/// Run a `selma model` subcommand.
pub fn run(c: ModelCommand) -> Result<()> {
    match c {
        ModelCommand::Init(a) => {
            let s = init_model_with_vocabulary(a.preset, &a.out, a.seed, &VOCABULARY)?;
            for (part, n) in &s.params {
                eprintln!("{part}: {n} parameters");
            }
            println!("{}", s.dir.display());
            Ok(())
        }
        ModelCommand::Convert(a) => {
            let dtype = selma_diffusion::pipeline::parse_dtype(&a.dtype)?;
            let n = convert_model(&a.dir, &a.out, dtype)?;
            eprintln!("{n} weight file(s) stored as {}", a.dtype);
            println!("{}", a.out.display());
            Ok(())
        }
        ModelCommand::Info(a) => {
            let idx = a.dir.join("model_index.json");
            let text = std::fs::read_to_string(&idx).with_context(|| {
                format!("reading {} (is this a diffusers folder?)", idx.display())
            })?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", idx.display()))?;
            println!(
                "pipeline: {}",
                v.get("_class_name").and_then(|c| c.as_str()).unwrap_or("?")
            );
            for part in ["unet", "vae", "text_encoder", "text_encoder_2"] {
                let d = a.dir.join(part);
                if !d.is_dir() {
                    continue;
                }
                if let Some(class) = weightless_codec(&d) {
                    println!("{part}: {class} (no weights)");
                    continue;
                }
                let src = SafetensorsSource::from_dir(&d)?;
                let n: usize = src
                    .keys()
                    .iter()
                    .filter_map(|k| src.shape(k))
                    .map(|s| s.iter().product::<usize>())
                    .sum();
                let files: Vec<String> = src
                    .files()
                    .iter()
                    .filter_map(|f| f.file_name().map(|n| n.to_string_lossy().to_string()))
                    .collect();
                println!(
                    "{part}: {:.1}M parameters ({})",
                    n as f64 / 1e6,
                    files.join(", ")
                );
            }
            Ok(())
        }
    }
}

/// Copy `src` to `out` (built in a sibling temp folder, then renamed),
/// rewriting every `.safetensors` file with its float tensors in `dtype`;
/// returns the number of weight files rewritten.
fn convert_model(src: &Path, out: &Path, dtype: DType) -> Result<usize> {
    ensure!(
        src.join("model_index.json").is_file(),
        "{} is not a diffusers model folder (no model_index.json)",
        src.display()
    );
    build_folder_atomically(out, |tmp| copy_converted(src, tmp, dtype))
}

fn copy_converted(src: &Path, dst: &Path, dtype: DType) -> Result<usize> {
    std::fs::create_dir_all(dst).with_context(|| format!("creating {}", dst.display()))?;
    let mut n = 0;
    for entry in std::fs::read_dir(src).with_context(|| format!("listing {}", src.display()))? {
        let entry = entry?;
        let (from, to) = (entry.path(), dst.join(entry.file_name()));
        if from.is_dir() {
            n += copy_converted(&from, &to, dtype)?;
        } else if from.extension().is_some_and(|e| e == "safetensors") {
            let tensors = candle_core::safetensors::load(&from, &Device::Cpu)
                .with_context(|| format!("reading {}", from.display()))?;
            let converted = tensors
                .into_iter()
                .map(|(k, t)| {
                    let t = if t.dtype().is_float() {
                        t.to_dtype(dtype)?
                    } else {
                        t
                    };
                    Ok((k, t))
                })
                .collect::<Result<HashMap<String, Tensor>>>()?;
            candle_core::safetensors::save(&converted, &to)
                .with_context(|| format!("writing {}", to.display()))?;
            n += 1;
        } else {
            std::fs::copy(&from, &to)
                .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        }
    }
    Ok(n)
}
