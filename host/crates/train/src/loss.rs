//! The diffusion training loss: the UNet's prediction on noised latents
//! against the epsilon, v or sample target (from the scheduler config), MSE
//! per sample, optionally weighted by min-SNR-gamma.

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};
use selma_diffusion::scheduler::config::{NoiseSchedule, PredictionType};
use selma_diffusion::unet::{SdxlAdded, UNet2DConditionModel};

/// The diffusion training loss of one batch.
/// `timesteps[i]` in `0..schedule.len()`; returns a scalar (f32, or f64 for f64 models).
#[allow(clippy::too_many_arguments)]
pub fn diffusion_loss(
    unet: &UNet2DConditionModel,
    schedule: &NoiseSchedule,
    prediction: PredictionType,
    min_snr_gamma: Option<f64>,
    latents: &Tensor,
    noise: &Tensor,
    timesteps: &[usize],
    context: &Tensor,
    added: Option<&SdxlAdded>,
) -> Result<Tensor> {
    let b = latents.dim(0)?;
    ensure!(
        timesteps.len() == b,
        "{} timesteps for a batch of {b}",
        timesteps.len()
    );
    let noisy = schedule.add_noise(latents, noise, timesteps)?;
    let t = Tensor::from_vec(
        timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>(),
        b,
        latents.device(),
    )?;
    let pred = unet.forward(&noisy, &t, context, added)?;
    let target = match prediction {
        PredictionType::Epsilon => noise.clone(),
        PredictionType::VPrediction => schedule.get_velocity(latents, noise, timesteps)?,
        PredictionType::Sample => latents.clone(),
    };
    let loss_dt = match pred.dtype() {
        DType::F64 => DType::F64,
        _ => DType::F32,
    };
    let diff = (pred.to_dtype(loss_dt)? - target.to_dtype(loss_dt)?)?;
    let per_sample = diff.sqr()?.flatten_from(1)?.mean(1)?;
    let loss = match min_snr_gamma {
        None => per_sample.mean_all()?,
        Some(gamma) => {
            let w = min_snr_weights(schedule, prediction, gamma, timesteps);
            let w = Tensor::from_vec(w, b, latents.device())?.to_dtype(loss_dt)?;
            (per_sample * w)?.mean_all()?
        }
    };
    Ok(loss)
}

/// Per-sample min-SNR-gamma weights: `min(snr, gamma) / snr` for epsilon
/// and sample targets, `min(snr, gamma) / (snr + 1)` for v-prediction, with
/// `snr = ᾱ_t / (1 - ᾱ_t)`.
pub fn min_snr_weights(
    schedule: &NoiseSchedule,
    prediction: PredictionType,
    gamma: f64,
    timesteps: &[usize],
) -> Vec<f64> {
    timesteps
        .iter()
        .map(|&t| {
            let a = schedule.alphas_cumprod[t];
            let snr = a / (1.0 - a);
            let m = snr.min(gamma);
            match prediction {
                PredictionType::VPrediction => m / (snr + 1.0),
                _ => m / snr,
            }
        })
        .collect()
}
