//! DPM-Solver++ 2M (Lu et al. 2022) as diffusers' `DPMSolverMultistepScheduler`
//! computes it with `algorithm_type = "dpmsolver++"`, `solver_order = 2`,
//! `solver_type = "midpoint"`: data-prediction multistep updates in
//! log-SNR time, first order at the start and (for the zero final sigma or
//! short schedules) at the end.

use super::config::{
    interp_index, karras_sigmas, linspace, round_half_even, SchedulerConfig, TimestepSpacing,
};
use super::{lin2, NoiseSource, PredictionType, Scheduler};
use anyhow::Result;
use candle_core::Tensor;

/// The DPM++ 2M sampler.
#[derive(Debug, Clone)]
pub struct DpmPp2M {
    timesteps: Vec<f64>,
    /// One sigma per step plus the final one (0 by default).
    pub sigmas: Vec<f64>,
    prediction: PredictionType,
    lower_order_final: bool,
    final_zero: bool,
    prev_x0: Option<Tensor>,
    lower_order_nums: usize,
}

/// The DPM++ inference timesteps for a spacing (descending).
pub fn dpm_timesteps(cfg: &SchedulerConfig, steps: usize) -> Vec<f64> {
    let n = cfg.num_train_timesteps;
    match cfg.timestep_spacing.unwrap_or(TimestepSpacing::Linspace) {
        TimestepSpacing::Linspace => {
            let mut t: Vec<f64> = linspace(0.0, (n - 1) as f64, steps + 1)
                .into_iter()
                .map(round_half_even)
                .rev()
                .collect();
            t.pop();
            t
        }
        TimestepSpacing::Leading => {
            let ratio = n / (steps + 1);
            (1..=steps)
                .rev()
                .map(|i| (i * ratio + cfg.steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = n as f64 / steps as f64;
            (0..steps)
                .map(|k| round_half_even(n as f64 - ratio * k as f64) - 1.0)
                .collect()
        }
    }
}

fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

fn lambda(sigma: f64) -> f64 {
    let (a, s) = alpha_sigma(sigma);
    a.ln() - s.ln()
}

impl DpmPp2M {
    /// Set up for `steps` steps, with Karras sigmas if `karras`.
    pub fn new(cfg: &SchedulerConfig, steps: usize, karras: bool) -> Result<Self> {
        let sched = cfg.noise_schedule();
        let train_sigmas = sched.sigmas();
        let (timesteps, mut sigmas) = if karras {
            let sigmas =
                karras_sigmas(train_sigmas[0], train_sigmas[train_sigmas.len() - 1], steps);
            let t = sigmas
                .iter()
                .map(|&s| round_half_even(sched.sigma_to_t(s)))
                .collect();
            (t, sigmas)
        } else {
            let t = dpm_timesteps(cfg, steps);
            let s = t.iter().map(|&t| interp_index(&train_sigmas, t)).collect();
            (t, s)
        };
        let final_zero = cfg.final_sigmas_type.as_deref().unwrap_or("zero") == "zero";
        sigmas.push(if final_zero { 0.0 } else { train_sigmas[0] });
        Ok(Self {
            timesteps,
            sigmas,
            prediction: cfg.prediction_type,
            lower_order_final: cfg.lower_order_final,
            final_zero,
            prev_x0: None,
            lower_order_nums: 0,
        })
    }
}

impl Scheduler for DpmPp2M {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigma(&self, i: usize) -> f64 {
        self.sigmas[i]
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let n = self.timesteps.len();
        let sigma_s0 = self.sigmas[i];
        let (alpha_s0, sig_s0) = alpha_sigma(sigma_s0);
        // Model output -> predicted x0 (data prediction).
        let x0 = match self.prediction {
            PredictionType::Epsilon => {
                lin2(sample, 1.0 / alpha_s0, model_output, -sig_s0 / alpha_s0)?
            }
            PredictionType::VPrediction => lin2(sample, alpha_s0, model_output, -sig_s0)?,
            PredictionType::Sample => model_output.clone(),
        };
        let last = i == n - 1;
        let lower_final = last && ((self.lower_order_final && n < 15) || self.final_zero);

        let sigma_t = self.sigmas[i + 1];
        let (alpha_t, sig_t) = alpha_sigma(sigma_t);
        let lambda_t = lambda(sigma_t);
        let lambda_s0 = lambda(sigma_s0);
        let h = lambda_t - lambda_s0;
        // exp(-h) - 1, exact at sigma_t = 0 (h = +inf).
        let em1 = (-h).exp() - 1.0;
        let ratio = if sigma_t == 0.0 { 0.0 } else { sig_t / sig_s0 };

        let first_order = self.lower_order_nums < 1 || lower_final || self.prev_x0.is_none();
        let out = if first_order {
            lin2(sample, ratio, &x0, -alpha_t * em1)?
        } else {
            let m1 = self.prev_x0.as_ref().expect("checked above");
            let lambda_s1 = lambda(self.sigmas[i - 1]);
            let r0 = (lambda_s0 - lambda_s1) / h;
            // D0 = x0, D1 = (x0 - m1) / r0; x_t = ratio * x - a_t*em1*D0 - 0.5*a_t*em1*D1
            let d1 = ((&x0 - m1)? * (1.0 / r0))?;
            let base = lin2(sample, ratio, &x0, -alpha_t * em1)?;
            (base + (d1 * (-0.5 * alpha_t * em1))?)?
        };
        self.prev_x0 = Some(x0);
        if self.lower_order_nums < 2 {
            self.lower_order_nums += 1;
        }
        Ok(out)
    }
}
