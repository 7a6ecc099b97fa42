//! Euler discrete (Karras et al. 2022, Algorithm 2 without churn) as
//! diffusers' `EulerDiscreteScheduler` computes it: sigmas interpolated at the
//! spaced timesteps (or the Karras ramp), a final sigma of 0.

use super::config::{
    interp_index, karras_sigmas, spaced_timesteps, SchedulerConfig, TimestepSpacing,
};
use super::{lin2, sigma_x0, NoiseSource, PredictionType, Scheduler};
use anyhow::Result;
use candle_core::Tensor;

/// Timesteps and sigmas (with the trailing 0) shared by the Euler samplers.
pub fn euler_sigmas(
    cfg: &SchedulerConfig,
    steps: usize,
    karras: bool,
) -> (Vec<f64>, Vec<f64>, f64) {
    let sched = cfg.noise_schedule();
    let train_sigmas = sched.sigmas();
    let spacing = cfg.timestep_spacing.unwrap_or(TimestepSpacing::Linspace);
    let mut timesteps = match spacing {
        // Euler keeps the un-rounded linspace values.
        TimestepSpacing::Linspace => {
            super::config::linspace(0.0, (cfg.num_train_timesteps - 1) as f64, steps)
                .into_iter()
                .rev()
                .collect()
        }
        s => spaced_timesteps(s, cfg.num_train_timesteps, steps, cfg.steps_offset),
    };
    let mut sigmas: Vec<f64> = timesteps
        .iter()
        .map(|&t| interp_index(&train_sigmas, t))
        .collect();
    if karras {
        let (lo, hi) = (sigmas[sigmas.len() - 1], sigmas[0]);
        sigmas = karras_sigmas(lo, hi, steps);
        timesteps = sigmas.iter().map(|&s| sched.sigma_to_t(s)).collect();
    }
    let max = sigmas.iter().cloned().fold(0.0, f64::max);
    let init = match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
        TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
    };
    sigmas.push(0.0);
    (timesteps, sigmas, init)
}

/// The Euler sampler.
#[derive(Debug, Clone)]
pub struct Euler {
    timesteps: Vec<f64>,
    /// One sigma per step plus the final 0.
    pub sigmas: Vec<f64>,
    init_sigma: f64,
    prediction: PredictionType,
}

impl Euler {
    /// Set up for `steps` steps, with Karras sigmas if `karras`.
    pub fn new(cfg: &SchedulerConfig, steps: usize, karras: bool) -> Result<Self> {
        let (timesteps, sigmas, init_sigma) = euler_sigmas(cfg, steps, karras);
        Ok(Self {
            timesteps,
            sigmas,
            init_sigma,
            prediction: cfg.prediction_type,
        })
    }
}

impl Scheduler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigma(&self, i: usize) -> f64 {
        self.sigmas[i]
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        let s = self.sigmas[i];
        Ok((sample * (1.0 / (s * s + 1.0).sqrt()))?)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let sigma = self.sigmas[i];
        let x0 = sigma_x0(self.prediction, sample, model_output, sigma)?;
        // derivative d = (x - x0) / sigma; x_next = x + d * (sigma_next - sigma)
        let dt = self.sigmas[i + 1] - sigma;
        let c = dt / sigma;
        lin2(sample, 1.0 + c, &x0, -c)
    }
}
