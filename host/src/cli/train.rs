//! `selma train`: train one LoRA expert on an image-caption folder (SELMA's
//! per-skill expert training) with selma-train; flags or a TOML file, the
//! defaults being the paper's recipe; progress bar with loss, step/s and ETA.

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use selma_train::dataset::Crop;
use selma_train::trainer::{TrainConfig, Trainer};
use std::path::PathBuf;

/// Train a LoRA expert on a dataset folder.
///
/// The dataset is a folder with metadata.jsonl (`file_name`, `text`) or images
/// with same-named .txt captions. Defaults follow SELMA: rank 128, alpha 128,
/// targets to_q,to_k,to_v,to_out.0, AdamW lr 3e-4 constant, batch 16 x 4,
/// 5000 steps, grad-norm clip 1. Checkpoints go to OUT.run/checkpoint-N/
/// (atomic); --resume continues exactly. A loss log is kept in OUT.run/loss.jsonl.
///
/// Example: selma train --model ./sd14 --data ./skills/counting --out counting.safetensors
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// TOML file with any of the settings below (flags override it).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Diffusers model folder (the student).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Dataset folder.
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Output LoRA file.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Run folder for checkpoints, logs, caches (default OUT.run).
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// LoRA rank [default: 128].
    #[arg(long)]
    pub rank: Option<usize>,
    /// LoRA alpha [default: 128].
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Target modules, comma separated [default: to_q,to_k,to_v,to_out.0].
    #[arg(long, value_delimiter = ',')]
    pub targets: Option<Vec<String>>,
    /// Optimizer updates [default: 5000].
    #[arg(long)]
    pub steps: Option<u64>,
    /// Images per micro-batch [default: 16].
    #[arg(long)]
    pub batch: Option<usize>,
    /// Micro-batches per update [default: 4].
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Learning rate [default: 3e-4].
    #[arg(long)]
    pub lr: Option<f64>,
    /// constant, constant_with_warmup or cosine [default: constant].
    #[arg(long)]
    pub lr_schedule: Option<String>,
    /// Warm-up updates (warm-up schedules).
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// Training resolution in pixels [default: 512].
    #[arg(long)]
    pub resolution: Option<u32>,
    /// Random crops instead of center crops.
    #[arg(long)]
    pub random_crop: bool,
    /// No random horizontal flips.
    #[arg(long)]
    pub no_flip: bool,
    /// min-SNR-gamma loss weighting (e.g. 5).
    #[arg(long)]
    pub min_snr_gamma: Option<f64>,
    /// Noise offset (e.g. 0.05).
    #[arg(long)]
    pub noise_offset: Option<f64>,
    /// Seed [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Checkpoint every N updates [default: 500].
    #[arg(long)]
    pub save_every: Option<u64>,
    /// Checkpoints kept in the run folder, 0 for all [default: 2].
    #[arg(long)]
    pub keep_checkpoints: Option<usize>,
    /// Resume from a checkpoint folder or a run folder (its newest checkpoint).
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Output layout: peft (diffusers) or kohya [default: peft].
    #[arg(long)]
    pub format: Option<String>,
    /// Skip bad dataset entries with a warning instead of failing.
    #[arg(long)]
    pub skip_bad: bool,
    /// A prompt rendered into RUN/validation/ during training (repeatable).
    #[arg(long = "validation-prompt", value_name = "TEXT")]
    pub validation_prompts: Vec<String>,
    /// Render the validation prompts every N updates.
    #[arg(long)]
    pub validation_every: Option<u64>,
    /// Device: cpu or cuda:N.
    #[arg(long)]
    pub device: Option<String>,
    /// UNet/text-encoder precision: f32, f16 or bf16 (LoRA and AdamW state stay f32).
    #[arg(long)]
    pub dtype: Option<String>,
}

/// Settings from `--config` (if any) overridden by the flags given.
pub fn config_from_args(a: &TrainArgs) -> Result<TrainConfig> {
    let mut c = match &a.config {
        Some(p) => TrainConfig::from_toml_file(p)?,
        None => TrainConfig::default(),
    };
    macro_rules! set {
        ($($f:ident),*) => {$( if let Some(v) = &a.$f { c.$f = v.clone(); } )*};
    }
    set!(
        model,
        data,
        out,
        rank,
        alpha,
        targets,
        steps,
        batch,
        grad_accum,
        lr,
        lr_schedule
    );
    set!(
        warmup_steps,
        resolution,
        seed,
        keep_checkpoints,
        save_every,
        format,
        device,
        dtype
    );
    if a.run_dir.is_some() {
        c.run_dir = a.run_dir.clone();
    }
    if a.min_snr_gamma.is_some() {
        c.min_snr_gamma = a.min_snr_gamma;
    }
    if let Some(o) = a.noise_offset {
        c.noise_offset = o;
    }
    if !a.validation_prompts.is_empty() {
        c.validation_prompts = a.validation_prompts.clone();
    }
    if let Some(n) = a.validation_every {
        c.validation_every = n;
    }
    if a.random_crop {
        c.crop = Crop::Random;
    }
    if a.no_flip {
        c.random_flip = false;
    }
    if a.skip_bad {
        c.skip_bad = true;
    }
    anyhow::ensure!(
        !c.model.as_os_str().is_empty(),
        "no model: pass --model DIR (or `model` in --config)"
    );
    anyhow::ensure!(
        !c.data.as_os_str().is_empty(),
        "no dataset: pass --data DIR (or `data` in --config)"
    );
    Ok(c)
}

/// Runs `selma train`.
pub fn run(a: TrainArgs) -> Result<()> {
    let cfg = config_from_args(&a)?;
    let mut t = Trainer::new(cfg.clone())?;
    if let Some(r) = &a.resume {
        t.resume(r)
            .with_context(|| format!("resuming from {}", r.display()))?;
    }
    eprintln!(
        "training {} LoRA layers (rank {}, alpha {}) on {} images; run folder {}",
        t.lora.layers.len(),
        cfg.rank,
        cfg.alpha,
        t.dataset.len(),
        cfg.run_dir().display()
    );
    let bar = ProgressBar::new(cfg.steps);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} step {pos}/{len} [{bar:30}] {per_sec} {elapsed_precise} eta {eta} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_position(t.state.step);
    bar.reset_eta();
    t.run(|s| {
        bar.set_position(s.step);
        bar.set_message(format!("loss {:.4} lr {:.2e}", s.loss, s.lr));
    })?;
    bar.finish();
    eprintln!(
        "wrote {} ({} format, {} updates)",
        cfg.out.display(),
        cfg.format,
        t.state.step
    );
    Ok(())
}
