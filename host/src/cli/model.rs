//! `selma model`: create random model folders in the diffusers layout
//! (`init`) and summarise existing ones (`info`).

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use selma_diffusion::init::{init_model, Preset};
use selma_diffusion::weights::{SafetensorsSource, TensorSource};
use std::path::PathBuf;

/// Create or inspect model folders.
#[derive(Subcommand, Debug)]
pub enum ModelCommand {
    /// Write a random model in the exact diffusers layout (configs included).
    ///
    /// `tiny`: a few-MB SD 1.x-style model with every block type (64x64 images,
    /// fast on CPU) for tests and demos. `sd15-random`: the SD 1.5
    /// architecture with random f16 weights (~2 GB) for GPU checks and timings.
    /// The same preset and seed give the same bytes.
    Init(InitArgs),
    /// Print a model folder's pipeline class, parts and parameter counts.
    Info(InfoArgs),
}

/// Arguments of `selma model init`.
#[derive(Args, Debug)]
pub struct InitArgs {
    /// tiny or sd15-random.
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

/// Run a `selma model` subcommand.
pub fn run(c: ModelCommand) -> Result<()> {
    match c {
        ModelCommand::Init(a) => {
            let s = init_model(a.preset, &a.out, a.seed)?;
            for (part, n) in &s.params {
                eprintln!("{part}: {n} parameters");
            }
            println!("{}", s.dir.display());
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
