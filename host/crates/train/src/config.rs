//! The configuration of a training run (`TrainConfig`): every setting with
//! SELMA's recipe as the default, TOML parsing, the run folder and the
//! validation of settings that cannot work together.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::dataset::Crop;
use crate::lora::{DEFAULT_TARGETS, TEXT_ENCODER_TARGETS};
use crate::optim::{AdamWConfig, LrSchedule};

/// Everything that defines a training run (TOML/JSON; missing keys take SELMA's recipe).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// diffusers model folder (the student).
    pub model: PathBuf,
    /// Dataset folder.
    pub data: PathBuf,
    /// Output LoRA file (full mode: output model folder).
    pub out: PathBuf,
    /// Run folder for checkpoints, logs and caches (default: `<out>.run`).
    pub run_dir: Option<PathBuf>,
    /// LoRA rank.
    pub rank: usize,
    /// LoRA alpha (scale = alpha / rank).
    pub alpha: f64,
    /// Target module names (suffixes of UNet module paths).
    pub targets: Vec<String>,
    /// Optimizer updates.
    pub steps: u64,
    /// Images per micro-batch.
    pub batch: usize,
    /// Micro-batches per update.
    pub grad_accum: usize,
    /// Base learning rate.
    pub lr: f64,
    /// `constant`, `constant_with_warmup` or `cosine`.
    pub lr_schedule: String,
    /// Warm-up updates for the warm-up schedules.
    pub warmup_steps: u64,
    /// Training resolution (square, pixels).
    pub resolution: u32,
    /// Seed of every random choice.
    pub seed: u64,
    /// Checkpoint every N updates (0: only at the end).
    pub save_every: u64,
    /// Checkpoints kept in the run folder (0: all).
    pub keep_checkpoints: usize,
    /// Output layout: `peft` or `kohya`.
    pub format: String,
    /// Crop mode.
    pub crop: Crop,
    /// Random horizontal flips.
    pub random_flip: bool,
    /// Gradient-norm clip.
    pub max_grad_norm: f64,
    /// AdamW hyper-parameters.
    pub adam: AdamWConfig,
    /// min-SNR-gamma loss weighting (None: plain MSE).
    pub min_snr_gamma: Option<f64>,
    /// Noise offset (0: off).
    pub noise_offset: f64,
    /// Skip bad dataset entries with a warning instead of failing.
    pub skip_bad: bool,
    /// Prompts rendered into `<run_dir>/validation/` every `validation_every` updates.
    pub validation_prompts: Vec<String>,
    /// Render the validation prompts every N updates (0: never).
    pub validation_every: u64,
    /// Sampling steps of validation renders (DDIM, guidance 7.5, seed = prompt index).
    pub validation_steps: usize,
    /// Device (`cpu`, `cuda:N`).
    pub device: String,
    /// UNet/text-encoder compute dtype (`f32`, `f16`, `bf16`); LoRA weights and AdamW state stay f32.
    pub dtype: String,
    /// Train every UNet weight instead of LoRA adapters; `out` is then a diffusers model folder.
    pub full: bool,
    /// Train the text encoder(s) too: every weight with `full` (unset: on),
    /// LoRA adapters on `text_encoder_targets` without it (unset: off).
    pub train_text_encoder: Option<bool>,
    /// Text-encoder modules that get LoRA adapters when the text encoder trains in LoRA mode.
    pub text_encoder_targets: Vec<String>,
    /// Probability of training a sample on the empty caption (for classifier-free guidance).
    pub caption_dropout: f64,
    /// EMA decay of the trained weights (0: off); the output then holds the EMA weights.
    pub ema_decay: f64,
    /// Ramp the EMA decay up as diffusers' EMAModel: `min(ema_decay, (1+s)/(10+s))`.
    pub ema_warmup: bool,
    /// Smallest training timestep (kohya's `min_timestep`): each sample's
    /// timestep is drawn uniformly from `min_timestep..max_timestep`.
    pub min_timestep: usize,
    /// One past the largest training timestep (kohya's `max_timestep`;
    /// default: the schedule's length, usually 1000). `min_timestep = 600`
    /// trains on high noise only, where layout and counts are decided.
    pub max_timestep: Option<usize>,
    /// What the update minimises: `sft` (the diffusion loss on image-caption
    /// pairs) or `dpo` (Diffusion-DPO on preference pairs from the data
    /// folder's `pairs.jsonl`, against the frozen base as reference).
    pub objective: Objective,
    /// Diffusion-DPO's beta: the scale of the per-pair error gap inside the
    /// sigmoid. Diffusion-DPO used 2500-5000 for SD latents; choose it so
    /// that beta times a typical error gap is of order 1.
    pub dpo_beta: f64,
}

/// The training objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Supervised fine-tuning: the diffusion loss on image-caption pairs.
    #[default]
    Sft,
    /// Diffusion-DPO on (caption, winner, loser) triples.
    Dpo,
}

impl std::str::FromStr for Objective {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sft" => Ok(Objective::Sft),
            "dpo" => Ok(Objective::Dpo),
            _ => anyhow::bail!("unknown objective \"{s}\": use sft or dpo"),
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: PathBuf::new(),
            data: PathBuf::new(),
            out: PathBuf::from("expert.safetensors"),
            run_dir: None,
            rank: 128,
            alpha: 128.0,
            targets: DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect(),
            steps: 5000,
            batch: 16,
            grad_accum: 4,
            lr: 3e-4,
            lr_schedule: "constant".into(),
            warmup_steps: 0,
            resolution: 512,
            seed: 0,
            save_every: 500,
            keep_checkpoints: 2,
            format: "peft".into(),
            crop: Crop::Center,
            random_flip: true,
            max_grad_norm: 1.0,
            adam: AdamWConfig::default(),
            min_snr_gamma: None,
            noise_offset: 0.0,
            skip_bad: false,
            validation_prompts: vec![],
            validation_every: 0,
            validation_steps: 20,
            device: "cpu".into(),
            dtype: "f32".into(),
            full: false,
            train_text_encoder: None,
            text_encoder_targets: TEXT_ENCODER_TARGETS.iter().map(|s| s.to_string()).collect(),
            caption_dropout: 0.0,
            ema_decay: 0.0,
            ema_warmup: true,
            min_timestep: 0,
            max_timestep: None,
            objective: Objective::Sft,
            dpo_beta: 500.0,
        }
    }
}

impl TrainConfig {
    /// Reads a TOML config file (errors name the file and key).
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_toml_str(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Parses a TOML config.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// The run folder (checkpoints, loss log, latent cache).
    pub fn run_dir(&self) -> PathBuf {
        self.run_dir.clone().unwrap_or_else(|| {
            let mut s = self.out.clone().into_os_string();
            s.push(".run");
            PathBuf::from(s)
        })
    }

    /// Whether the text encoder(s) are trained (default: on in full mode, off with LoRA).
    pub fn trains_text_encoder(&self) -> bool {
        self.train_text_encoder.unwrap_or(self.full)
    }

    /// Refuses settings that cannot work (or not together); errors name the flag.
    pub fn check(&self) -> Result<()> {
        ensure!(
            self.full || !self.trains_text_encoder() || !self.text_encoder_targets.is_empty(),
            "--train-text-encoder with LoRA needs --text-encoder-targets"
        );
        ensure!(
            !self.full || self.dtype == "f32",
            "--full trains in f32: drop --dtype {} (or set dtype = \"f32\")",
            self.dtype
        );
        ensure!(
            !self.full || self.out.extension().is_none_or(|e| e != "safetensors"),
            "--full writes a model folder: --out {} looks like a LoRA file; pass a folder path",
            self.out.display()
        );
        ensure!(
            (0.0..=1.0).contains(&self.caption_dropout),
            "--caption-dropout {} must be a probability in [0, 1]",
            self.caption_dropout
        );
        ensure!(
            (0.0..1.0).contains(&self.ema_decay),
            "--ema-decay {} must be in [0, 1) (0 turns EMA off)",
            self.ema_decay
        );
        if let Some(max) = self.max_timestep {
            ensure!(
                self.min_timestep < max,
                "--min-timestep {} must be below --max-timestep {max}",
                self.min_timestep
            );
        }
        if self.objective == Objective::Dpo {
            ensure!(
                !self.full && !self.trains_text_encoder(),
                "--objective dpo trains a UNet LoRA against the frozen base: drop --full and --train-text-encoder"
            );
            ensure!(
                self.dpo_beta.is_finite() && self.dpo_beta > 0.0,
                "--dpo-beta {} must be a positive number",
                self.dpo_beta
            );
        }
        ensure!(self.batch > 0, "--batch must be at least 1");
        ensure!(self.grad_accum > 0, "--grad-accum must be at least 1");
        ensure!(self.rank > 0, "--rank must be at least 1");
        ensure!(
            self.resolution >= 8 && self.resolution.is_multiple_of(8),
            "--resolution {} must be a multiple of 8",
            self.resolution
        );
        ensure!(!self.targets.is_empty(), "--targets is empty");
        LrSchedule::parse(&self.lr_schedule, self.warmup_steps, self.steps)?;
        self.format.parse::<selma_lora::LoraFormat>()?;
        Ok(())
    }
}
