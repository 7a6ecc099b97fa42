//! The scheduler configuration (`scheduler/scheduler_config.json` of a
//! diffusers folder) and the training noise schedule it defines: betas,
//! cumulative alphas, sigmas, inference timestep spacing, Karras sigmas, and
//! the per-sample helpers a trainer needs (`add_noise`, `get_velocity`).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use std::path::Path;

/// How betas are spread over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum BetaSchedule {
    /// `linspace(beta_start, beta_end, N)`.
    #[serde(rename = "linear")]
    Linear,
    /// `linspace(sqrt(beta_start), sqrt(beta_end), N)^2` (Stable Diffusion).
    #[serde(rename = "scaled_linear")]
    ScaledLinear,
    /// The cosine schedule of improved DDPM (alpha_bar capped at beta 0.999).
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredCosCapV2,
}

/// How the inference timesteps are picked among the training ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum TimestepSpacing {
    /// Evenly spaced over `[0, N-1]`, rounded.
    #[serde(rename = "linspace")]
    Linspace,
    /// `k * (N / steps)` (integer ratio) plus `steps_offset`.
    #[serde(rename = "leading")]
    Leading,
    /// From `N` down by `N / steps` (float ratio), minus one.
    #[serde(rename = "trailing")]
    Trailing,
}

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum PredictionType {
    /// The added noise (SD 1.x, SDXL).
    #[serde(rename = "epsilon")]
    Epsilon,
    /// The velocity `sqrt(a) * noise - sqrt(1 - a) * x0` (SD 2.x 768).
    #[serde(rename = "v_prediction")]
    VPrediction,
    /// The clean sample itself.
    #[serde(rename = "sample")]
    Sample,
}

/// `scheduler_config.json`, whichever scheduler class wrote it: every field
/// any of our schedulers reads, with diffusers' defaults where absent.
#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerConfig {
    /// The diffusers class that wrote the file (informational).
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    /// Number of training timesteps N.
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: usize,
    /// First beta.
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    /// Last beta.
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    /// Beta schedule.
    #[serde(default = "default_beta_schedule")]
    pub beta_schedule: BetaSchedule,
    /// Explicit betas, overriding the schedule when present.
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    /// What the UNet predicts.
    #[serde(default = "default_prediction")]
    pub prediction_type: PredictionType,
    /// Spacing; `None` means each scheduler's own diffusers default
    /// (DDIM: leading, Euler / DPM++: linspace).
    #[serde(default)]
    pub timestep_spacing: Option<TimestepSpacing>,
    /// Added to leading-spaced timesteps.
    #[serde(default)]
    pub steps_offset: usize,
    /// DDIM: use alpha_prod = 1 for the step past the last (else alphas_cumprod[0]).
    #[serde(default = "default_true")]
    pub set_alpha_to_one: bool,
    /// DDIM: clamp the predicted x0 (`None`: DDIM's default, true).
    #[serde(default)]
    pub clip_sample: Option<bool>,
    /// DDIM: clamp range for `clip_sample`.
    #[serde(default = "default_one")]
    pub clip_sample_range: f64,
    /// Euler / DPM++: replace the sigmas by the Karras et al. schedule.
    #[serde(default)]
    pub use_karras_sigmas: Option<bool>,
    /// DPM++: "zero" (default) or "sigma_min" for the last sigma.
    #[serde(default)]
    pub final_sigmas_type: Option<String>,
    /// DPM++: use first-order updates at the end for short schedules.
    #[serde(default = "default_true")]
    pub lower_order_final: bool,
}

fn default_train_steps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_end() -> f64 {
    0.02
}
fn default_beta_schedule() -> BetaSchedule {
    BetaSchedule::Linear
}
fn default_prediction() -> PredictionType {
    PredictionType::Epsilon
}
fn default_true() -> bool {
    true
}
fn default_one() -> f64 {
    1.0
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("empty scheduler config parses")
    }
}

impl SchedulerConfig {
    /// Read `scheduler_config.json` (errors name the file).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading scheduler config {}", path.display()))?;
        Self::from_json(&text)
            .with_context(|| format!("parsing scheduler config {}", path.display()))
    }

    /// Parse the JSON text of a scheduler config and validate it.
    pub fn from_json(text: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(text)?;
        if cfg.num_train_timesteps < 2 {
            bail!(
                "num_train_timesteps must be at least 2, got {}",
                cfg.num_train_timesteps
            );
        }
        if let Some(b) = &cfg.trained_betas {
            if b.len() != cfg.num_train_timesteps {
                bail!(
                    "trained_betas has {} values but num_train_timesteps is {}",
                    b.len(),
                    cfg.num_train_timesteps
                );
            }
        }
        if let Some(t) = cfg.final_sigmas_type.as_deref() {
            if t != "zero" && t != "sigma_min" {
                bail!("final_sigmas_type must be \"zero\" or \"sigma_min\", got {t:?}");
            }
        }
        Ok(cfg)
    }

    /// The betas of the training schedule (f64).
    pub fn betas(&self) -> Vec<f64> {
        let n = self.num_train_timesteps;
        if let Some(b) = &self.trained_betas {
            return b.clone();
        }
        match self.beta_schedule {
            BetaSchedule::Linear => linspace(self.beta_start, self.beta_end, n),
            BetaSchedule::ScaledLinear => linspace(self.beta_start.sqrt(), self.beta_end.sqrt(), n)
                .into_iter()
                .map(|b| b * b)
                .collect(),
            BetaSchedule::SquaredCosCapV2 => {
                let alpha_bar = |t: f64| {
                    ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                        .cos()
                        .powi(2)
                };
                (0..n)
                    .map(|i| {
                        let t1 = i as f64 / n as f64;
                        let t2 = (i + 1) as f64 / n as f64;
                        (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999)
                    })
                    .collect()
            }
        }
    }

    /// The training noise schedule this config defines.
    pub fn noise_schedule(&self) -> NoiseSchedule {
        NoiseSchedule::from_betas(&self.betas())
    }
}

/// `n` evenly spaced values from `a` to `b` inclusive (numpy's linspace).
pub fn linspace(a: f64, b: f64, n: usize) -> Vec<f64> {
    match n {
        0 => vec![],
        1 => vec![a],
        _ => {
            let step = (b - a) / (n - 1) as f64;
            (0..n).map(|i| a + step * i as f64).collect()
        }
    }
}

/// Round half to even, like numpy's `round`.
pub fn round_half_even(x: f64) -> f64 {
    x.round_ties_even()
}

/// The inference timesteps (descending) for a spacing, as diffusers'
/// DDIM / Euler `set_timesteps` compute them.
pub fn spaced_timesteps(
    spacing: TimestepSpacing,
    num_train: usize,
    steps: usize,
    steps_offset: usize,
) -> Vec<f64> {
    let n = num_train as f64;
    match spacing {
        TimestepSpacing::Linspace => linspace(0.0, n - 1.0, steps)
            .into_iter()
            .rev()
            .map(round_half_even)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = num_train / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio + steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = n / steps as f64;
            // np.arange(N, 0, -ratio): N, N - ratio, ... (`steps` values).
            (0..steps)
                .map(|k| round_half_even(n - ratio * k as f64) - 1.0)
                .collect()
        }
    }
}

/// The Karras et al. (2022) sigma ramp with rho = 7 between `sigma_max` and
/// `sigma_min`, `n` values, descending.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// Piecewise-linear interpolation of `ys` (at x = 0, 1, 2, ...) at `x`, clamped.
pub fn interp_index(ys: &[f64], x: f64) -> f64 {
    if x <= 0.0 {
        return ys[0];
    }
    let last = ys.len() - 1;
    if x >= last as f64 {
        return ys[last];
    }
    let i = x.floor() as usize;
    let w = x - i as f64;
    ys[i] * (1.0 - w) + ys[i + 1] * w
}

/// The training noise schedule: cumulative alphas and the matching sigmas.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    /// `cumprod(1 - beta)`, one per training timestep.
    pub alphas_cumprod: Vec<f64>,
}

impl NoiseSchedule {
    /// From explicit betas.
    pub fn from_betas(betas: &[f64]) -> Self {
        let mut acc = 1.0;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect();
        Self { alphas_cumprod }
    }

    /// Number of training timesteps.
    pub fn len(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// Whether the schedule is empty (never, for a valid config).
    pub fn is_empty(&self) -> bool {
        self.alphas_cumprod.is_empty()
    }

    /// `sqrt((1 - a) / a)` per training timestep (the k-diffusion sigmas).
    pub fn sigmas(&self) -> Vec<f64> {
        self.alphas_cumprod
            .iter()
            .map(|a| ((1.0 - a) / a).sqrt())
            .collect()
    }

    /// The (fractional) timestep of a sigma, by linear interpolation in
    /// log-sigma between neighbouring training timesteps (diffusers' `_sigma_to_t`).
    pub fn sigma_to_t(&self, sigma: f64) -> f64 {
        let log_sigmas: Vec<f64> = self.sigmas().iter().map(|s| s.ln()).collect();
        let ls = sigma.max(1e-10).ln();
        // low_idx: last index whose log_sigma is <= ls, clipped to len - 2.
        let count = log_sigmas.iter().filter(|&&l| ls - l >= 0.0).count();
        let low_idx = count.saturating_sub(1).min(log_sigmas.len() - 2);
        let high_idx = low_idx + 1;
        let low = log_sigmas[low_idx];
        let high = log_sigmas[high_idx];
        let w = ((low - ls) / (low - high)).clamp(0.0, 1.0);
        (1.0 - w) * low_idx as f64 + w * high_idx as f64
    }

    fn coefs(&self, timesteps: &[usize], f: impl Fn(f64) -> f64) -> Result<Vec<f32>> {
        timesteps
            .iter()
            .map(|&t| {
                let a = *self.alphas_cumprod.get(t).with_context(|| {
                    format!(
                        "timestep {t} is outside the training schedule (0..{})",
                        self.len()
                    )
                })?;
                Ok(f(a) as f32)
            })
            .collect()
    }

    fn per_sample(&self, v: Vec<f32>, like: &Tensor) -> Result<Tensor> {
        let b = like.dim(0)?;
        if v.len() != b {
            bail!("{} timesteps for a batch of {b}", v.len());
        }
        let mut shape = vec![b];
        shape.extend(std::iter::repeat_n(1, like.rank() - 1));
        Ok(Tensor::from_vec(v, shape, like.device())?.to_dtype(like.dtype())?)
    }

    /// Forward diffusion per sample: `sqrt(a_t) * x0 + sqrt(1 - a_t) * noise`
    /// with one timestep per batch element.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        let sa = self.per_sample(self.coefs(timesteps, |a| a.sqrt())?, x0)?;
        let sb = self.per_sample(self.coefs(timesteps, |a| (1.0 - a).sqrt())?, x0)?;
        Ok((x0.broadcast_mul(&sa)? + noise.broadcast_mul(&sb)?)?)
    }

    /// The v-prediction target per sample: `sqrt(a_t) * noise - sqrt(1 - a_t) * x0`.
    pub fn get_velocity(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        let sa = self.per_sample(self.coefs(timesteps, |a| a.sqrt())?, x0)?;
        let sb = self.per_sample(self.coefs(timesteps, |a| (1.0 - a).sqrt())?, x0)?;
        Ok((noise.broadcast_mul(&sa)? - x0.broadcast_mul(&sb)?)?)
    }
}

/// A 1-D f32 tensor of timesteps repeated for a batch (what the UNet takes).
pub fn timestep_tensor(t: f64, batch: usize, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(vec![t as f32; batch], batch, device)?.to_dtype(DType::F32)?)
}
