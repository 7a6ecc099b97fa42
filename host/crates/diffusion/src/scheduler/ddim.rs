//! DDIM (Song et al. 2020) as diffusers' `DDIMScheduler` computes it:
//! integer timesteps, `prev = t - N / steps`, optional x0 clipping, eta noise.

use super::config::{spaced_timesteps, SchedulerConfig, TimestepSpacing};
use super::{lin2, NoiseSource, PredictionType, Scheduler};
use anyhow::Result;
use candle_core::Tensor;

/// The DDIM sampler.
#[derive(Debug, Clone)]
pub struct Ddim {
    timesteps: Vec<f64>,
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    step_ratio: usize,
    eta: f64,
    prediction: PredictionType,
    clip: Option<f64>,
}

impl Ddim {
    /// Set up for `steps` steps with noise level `eta` (0: deterministic).
    pub fn new(cfg: &SchedulerConfig, steps: usize, eta: f64) -> Result<Self> {
        let sched = cfg.noise_schedule();
        let spacing = cfg.timestep_spacing.unwrap_or(TimestepSpacing::Leading);
        let timesteps = spaced_timesteps(spacing, cfg.num_train_timesteps, steps, cfg.steps_offset);
        anyhow::ensure!(eta >= 0.0, "DDIM eta must be >= 0, got {eta}");
        Ok(Self {
            timesteps,
            final_alpha_cumprod: if cfg.set_alpha_to_one {
                1.0
            } else {
                sched.alphas_cumprod[0]
            },
            alphas_cumprod: sched.alphas_cumprod,
            step_ratio: cfg.num_train_timesteps / steps,
            eta,
            prediction: cfg.prediction_type,
            clip: cfg
                .clip_sample
                .unwrap_or(true)
                .then_some(cfg.clip_sample_range),
        })
    }

    /// `alpha_prod` at timestep `t` and at the previous timestep of the chain.
    pub fn alphas_at(&self, t: usize) -> (f64, f64) {
        let a_t = self.alphas_cumprod[t.min(self.alphas_cumprod.len() - 1)];
        let a_prev = if t >= self.step_ratio {
            self.alphas_cumprod[t - self.step_ratio]
        } else {
            self.final_alpha_cumprod
        };
        (a_t, a_prev)
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigma(&self, i: usize) -> f64 {
        let a = self.alphas_at(self.timesteps[i] as usize).0;
        ((1.0 - a) / a).sqrt()
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, _i: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let t = self.timesteps[i] as usize;
        let (a_t, a_prev) = self.alphas_at(t);
        let b_t = 1.0 - a_t;
        let (mut x0, eps) = match self.prediction {
            PredictionType::Epsilon => (
                lin2(
                    sample,
                    1.0 / a_t.sqrt(),
                    model_output,
                    -b_t.sqrt() / a_t.sqrt(),
                )?,
                model_output.clone(),
            ),
            PredictionType::VPrediction => (
                lin2(sample, a_t.sqrt(), model_output, -b_t.sqrt())?,
                lin2(model_output, a_t.sqrt(), sample, b_t.sqrt())?,
            ),
            PredictionType::Sample => {
                let x0 = model_output.clone();
                let eps = lin2(sample, 1.0 / b_t.sqrt(), &x0, -a_t.sqrt() / b_t.sqrt())?;
                (x0, eps)
            }
        };
        if let Some(r) = self.clip {
            x0 = x0.clamp(-r, r)?;
        }
        let variance = ((1.0 - a_prev) / b_t) * (1.0 - a_t / a_prev);
        let std = self.eta * variance.max(0.0).sqrt();
        let dir = (1.0 - a_prev - std * std).max(0.0).sqrt();
        let mut prev = lin2(&x0, a_prev.sqrt(), &eps, dir)?;
        if self.eta > 0.0 {
            let z = noise.noise_like(model_output)?;
            prev = (prev + (z * std)?)?;
        }
        Ok(prev)
    }
}
