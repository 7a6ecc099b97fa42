//! Euler ancestral as diffusers' `EulerAncestralDiscreteScheduler` computes
//! it: an Euler step down to `sigma_down`, then fresh noise of `sigma_up`.

use super::config::SchedulerConfig;
use super::euler::euler_sigmas;
use super::{lin2, sigma_x0, NoiseSource, PredictionType, Scheduler};
use anyhow::Result;
use candle_core::Tensor;

/// The Euler ancestral sampler.
#[derive(Debug, Clone)]
pub struct EulerAncestral {
    timesteps: Vec<f64>,
    /// One sigma per step plus the final 0.
    pub sigmas: Vec<f64>,
    init_sigma: f64,
    prediction: PredictionType,
}

impl EulerAncestral {
    /// Set up for `steps` steps.
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        let (timesteps, sigmas, init_sigma) = euler_sigmas(cfg, steps, false);
        Ok(Self {
            timesteps,
            sigmas,
            init_sigma,
            prediction: cfg.prediction_type,
        })
    }
}

impl Scheduler for EulerAncestral {
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
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let (from, to) = (self.sigmas[i], self.sigmas[i + 1]);
        let x0 = sigma_x0(self.prediction, sample, model_output, from)?;
        let up = (to * to * (from * from - to * to) / (from * from))
            .max(0.0)
            .sqrt();
        let down = (to * to - up * up).max(0.0).sqrt();
        let c = (down - from) / from;
        let prev = lin2(sample, 1.0 + c, &x0, -c)?;
        if up > 0.0 {
            let z = noise.noise_like(model_output)?;
            Ok((prev + (z * up)?)?)
        } else {
            Ok(prev)
        }
    }
}
