//! Samplers driven by a diffusers `scheduler_config.json`: DDIM, Euler,
//! Euler ancestral and DPM++ 2M (optionally with Karras sigmas), plus the
//! config / noise schedule (`config`) and seeded noise (`noise`). The formulas
//! follow diffusers' schedulers; each step works on whole batches.

pub mod config;
pub mod ddim;
pub mod dpmpp_2m;
pub mod euler;
pub mod euler_ancestral;
pub mod noise;

pub use config::{NoiseSchedule, PredictionType, SchedulerConfig, TimestepSpacing};
pub use noise::{BatchNoise, GaussianRng, NoiseSource};

use anyhow::{bail, Result};
use candle_core::Tensor;

/// One sampler, set up for a number of inference steps.
pub trait Scheduler: Send {
    /// The timesteps handed to the UNet, one per step, descending.
    fn timesteps(&self) -> &[f64];
    /// Scale of the initial noise (`latents = noise * init_noise_sigma`).
    fn init_noise_sigma(&self) -> f64;
    /// The noise level of the latents at step `i` as a k-diffusion sigma
    /// (`sqrt((1 - a) / a)`), whatever the sampler's own parameterisation.
    fn sigma(&self, i: usize) -> f64;
    /// Scale the latents before the UNet at step `i`.
    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor>;
    /// Go from step `i`'s latents to the next ones given the model output.
    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor>;
}

/// The samplers `selma generate --scheduler` offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    /// DDIM (deterministic with eta 0).
    Ddim,
    /// Euler discrete.
    Euler,
    /// Euler ancestral (stochastic).
    EulerAncestral,
    /// DPM-Solver++ 2M (multistep, second order).
    DpmPp2M,
}

impl SchedulerKind {
    /// The command-line name (`ddim`, `euler`, `euler-a`, `dpm++2m`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler-a",
            Self::DpmPp2M => "dpm++2m",
        }
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for SchedulerKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "ddim" => Self::Ddim,
            "euler" => Self::Euler,
            "euler-a" | "euler_a" | "euler-ancestral" => Self::EulerAncestral,
            "dpm++2m" | "dpmpp2m" | "dpm++-2m" | "dpmpp_2m" => Self::DpmPp2M,
            other => bail!("unknown scheduler {other:?}: use ddim, euler, euler-a or dpm++2m"),
        })
    }
}

/// Options that come from the command line rather than the config.
#[derive(Debug, Clone, Copy, Default)]
pub struct SamplerOptions {
    /// DDIM eta (0 = deterministic).
    pub eta: f64,
    /// Force Karras sigmas on (Euler, DPM++); `None` keeps the config's choice.
    pub karras: Option<bool>,
}

/// Build a scheduler of `kind` from a folder's config for `steps` steps.
pub fn build(
    kind: SchedulerKind,
    cfg: &SchedulerConfig,
    steps: usize,
    opts: SamplerOptions,
) -> Result<Box<dyn Scheduler>> {
    if steps == 0 {
        bail!("the number of inference steps must be at least 1");
    }
    if steps > cfg.num_train_timesteps {
        bail!(
            "{steps} inference steps exceed the {} training timesteps of this scheduler config",
            cfg.num_train_timesteps
        );
    }
    // The config's use_karras_sigmas applies where the sampler supports it;
    // an explicit request for a sampler without Karras sigmas is an error.
    let karras = opts.karras.or(cfg.use_karras_sigmas).unwrap_or(false);
    let asked = opts.karras == Some(true);
    Ok(match kind {
        SchedulerKind::Ddim => {
            if asked {
                bail!("--karras applies to euler and dpm++2m, not ddim");
            }
            Box::new(ddim::Ddim::new(cfg, steps, opts.eta)?)
        }
        SchedulerKind::Euler => Box::new(euler::Euler::new(cfg, steps, karras)?),
        SchedulerKind::EulerAncestral => {
            if asked {
                bail!("--karras applies to euler and dpm++2m, not euler-a");
            }
            Box::new(euler_ancestral::EulerAncestral::new(cfg, steps)?)
        }
        SchedulerKind::DpmPp2M => Box::new(dpmpp_2m::DpmPp2M::new(cfg, steps, karras)?),
    })
}

/// `a * x + b * y` for scalar coefficients.
pub(crate) fn lin2(x: &Tensor, a: f64, y: &Tensor, b: f64) -> Result<Tensor> {
    Ok(((x * a)? + (y * b)?)?)
}

/// x0 predicted from a k-diffusion (sigma-parameterised) model output.
pub(crate) fn sigma_x0(
    pred: PredictionType,
    sample: &Tensor,
    out: &Tensor,
    sigma: f64,
) -> Result<Tensor> {
    match pred {
        PredictionType::Epsilon => lin2(sample, 1.0, out, -sigma),
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            lin2(out, -sigma / s2.sqrt(), sample, 1.0 / s2)
        }
        PredictionType::Sample => Ok(out.clone()),
    }
}
