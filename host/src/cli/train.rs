//! `selma train`: train one LoRA expert on an image-caption folder (SELMA's
//! per-skill expert training) with selma-train, or with `--full` every UNet
//! (and text-encoder) weight into a new diffusers model folder; flags or a
//! TOML file, the defaults being the paper's recipe; progress bar with loss,
//! step/s and ETA.

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use selma_train::dataset::Crop;
use selma_train::trainer::{TrainConfig, Trainer};
use std::io::IsTerminal;
use std::path::PathBuf;

/// Train a LoRA expert (or, with --full, a whole model) on a dataset folder.
///
/// The dataset is a folder with metadata.jsonl (`file_name`, `text`) or images
/// with same-named .txt captions. Defaults follow SELMA: rank 128, alpha 128,
/// targets to_q,to_k,to_v,to_out.0, AdamW lr 3e-4 constant, batch 16 x 4,
/// 5000 steps, grad-norm clip 1. Checkpoints go to OUT.run/checkpoint-N/
/// (atomic); --resume continues exactly. A loss log is kept in OUT.run/loss.jsonl.
/// With --full, OUT is a diffusers model folder (loadable by `selma generate`)
/// holding the trained UNet and text encoder (EMA weights with --ema-decay).
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
    /// LoRA alpha; scale = alpha / rank [default: 128, or the --rank given, so that
    /// `--rank 16` alone keeps SELMA's scale of 1].
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Target modules, comma separated [default: to_q,to_k,to_v,to_out.0].
    #[arg(long, value_delimiter = ',')]
    pub targets: Option<Vec<String>>,
    /// Text-encoder modules adapted with --train-text-encoder in LoRA mode
    /// [default: q_proj,k_proj,v_proj,out_proj].
    #[arg(long, value_delimiter = ',')]
    pub text_encoder_targets: Option<Vec<String>>,
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
    /// What the update minimises: sft (the diffusion loss on image-caption
    /// pairs) or dpo (Diffusion-DPO on DATA/pairs.jsonl, lines of {"text",
    /// "winner", "loser"}, against the frozen base; UNet LoRA only)
    /// [default: sft].
    #[arg(long, value_name = "OBJECTIVE")]
    pub objective: Option<selma_train::config::Objective>,
    /// Diffusion-DPO's beta: beta times a typical winner/loser error gap
    /// should be about 1 (Diffusion-DPO used 2500-5000 for SD latents)
    /// [default: 500].
    #[arg(long, value_name = "BETA")]
    pub dpo_beta: Option<f64>,
    /// Smallest training timestep: timesteps are drawn uniformly from
    /// MIN..MAX (kohya's --min_timestep) [default: 0].
    #[arg(long, value_name = "MIN")]
    pub min_timestep: Option<usize>,
    /// One past the largest training timestep (kohya's --max_timestep)
    /// [default: the schedule's length, 1000]. `--min-timestep 600` trains
    /// on high noise only, where layout, counts and binding are decided.
    #[arg(long, value_name = "MAX")]
    pub max_timestep: Option<usize>,
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
    /// Train every UNet weight instead of a LoRA; --out is then a model folder.
    #[arg(long)]
    pub full: bool,
    /// Train the text encoder too: with --full every weight (the default there),
    /// else LoRA adapters on --text-encoder-targets, saved beside the UNet's
    /// under `text_encoder.` (peft) / `lora_te_` (kohya).
    #[arg(long, conflicts_with = "no_train_text_encoder")]
    pub train_text_encoder: bool,
    /// Keep the text encoder frozen (its embeddings are cached); the default for LoRA.
    #[arg(long)]
    pub no_train_text_encoder: bool,
    /// Probability of training on the empty caption, for guidance (e.g. 0.1) [default: 0].
    #[arg(long)]
    pub caption_dropout: Option<f64>,
    /// EMA decay of the trained weights, used for the output (e.g. 0.995; 0 = off) [default: 0].
    #[arg(long)]
    pub ema_decay: Option<f64>,
    /// Constant EMA decay from the first update (no (1+s)/(10+s) warm-up).
    #[arg(long)]
    pub no_ema_warmup: bool,
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
        text_encoder_targets,
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
    if a.config.is_none() && a.alpha.is_none() {
        if let Some(r) = a.rank {
            // SELMA's recipe has alpha = rank (scale 1); keep that relation.
            c.alpha = r as f64;
        }
    }
    if a.run_dir.is_some() {
        c.run_dir = a.run_dir.clone();
    }
    if a.min_snr_gamma.is_some() {
        c.min_snr_gamma = a.min_snr_gamma;
    }
    if let Some(o) = a.noise_offset {
        c.noise_offset = o;
    }
    if let Some(o) = a.objective {
        c.objective = o;
    }
    if let Some(b) = a.dpo_beta {
        c.dpo_beta = b;
    }
    if let Some(t) = a.min_timestep {
        c.min_timestep = t;
    }
    if a.max_timestep.is_some() {
        c.max_timestep = a.max_timestep;
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
    if a.full {
        c.full = true;
    }
    if a.train_text_encoder {
        c.train_text_encoder = Some(true);
    }
    if a.no_train_text_encoder {
        c.train_text_encoder = Some(false);
    }
    if let Some(p) = a.caption_dropout {
        c.caption_dropout = p;
    }
    if let Some(d) = a.ema_decay {
        c.ema_decay = d;
    }
    if a.no_ema_warmup {
        c.ema_warmup = false;
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
    if cfg.full {
        let n: usize = t.opt.params.iter().map(|p| p.elem_count()).sum();
        let parts: Vec<&str> = t.full.iter().map(|p| p.component.as_str()).collect();
        eprintln!(
            "training all weights of {} ({n} parameters) on {} images; run folder {}",
            parts.join(" + "),
            t.dataset.len(),
            cfg.run_dir().display()
        );
    } else {
        eprintln!(
            "training {} LoRA layers (rank {}, alpha {}) on {} images; run folder {}",
            t.lora.layers.len(),
            cfg.rank,
            cfg.alpha,
            t.dataset.len(),
            cfg.run_dir().display()
        );
    }
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
    // Without a terminal (logs, CI) the bar is hidden: print plain progress lines instead.
    let plain = !std::io::stderr().is_terminal();
    let every = (cfg.steps / 20).max(1);
    let start = std::time::Instant::now();
    let first = t.state.step;
    t.run(|s| {
        bar.set_position(s.step);
        bar.set_message(format!("loss {:.4} lr {:.2e}", s.loss, s.lr));
        if plain && (s.step % every == 0 || s.step == cfg.steps) {
            let secs = start.elapsed().as_secs_f64();
            let rate = (s.step - first) as f64 / secs.max(1e-9);
            let eta = cfg.steps.saturating_sub(s.step) as f64 / rate.max(1e-9);
            eprintln!(
                "step {}/{} loss {:.5} lr {:.2e} {:.2} step/s eta {:.0}s",
                s.step, cfg.steps, s.loss, s.lr, rate, eta
            );
        }
    })?;
    bar.finish();
    let weights = if cfg.ema_decay > 0.0 {
        format!(", EMA {} weights", cfg.ema_decay)
    } else {
        String::new()
    };
    if cfg.full {
        eprintln!(
            "wrote the model folder {} ({} updates{weights})",
            cfg.out.display(),
            t.state.step
        );
    } else {
        eprintln!(
            "wrote {} ({} format, {} updates{weights})",
            cfg.out.display(),
            cfg.format,
            t.state.step
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: TrainArgs,
    }

    fn cfg(argv: &[&str]) -> TrainConfig {
        let mut full = vec!["selma-train", "--model", "m", "--data", "d", "--out", "o"];
        full.extend_from_slice(argv);
        config_from_args(&Wrap::parse_from(full).args).unwrap()
    }

    #[test]
    fn alpha_follows_a_given_rank_unless_set() {
        let d = TrainConfig::default();
        assert_eq!((cfg(&[]).rank, cfg(&[]).alpha), (d.rank, d.alpha));
        let c = cfg(&["--rank", "16"]);
        assert_eq!((c.rank, c.alpha), (16, 16.0));
        let c = cfg(&["--rank", "16", "--alpha", "4"]);
        assert_eq!((c.rank, c.alpha), (16, 4.0));
    }
}
