//! The diffusion training loss: the UNet's prediction on noised latents
//! against the epsilon, v or sample target (from the scheduler config), MSE
//! per sample, optionally weighted by min-SNR-gamma; and the Diffusion-DPO
//! preference loss built from those per-sample errors.

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
    let per_sample = per_sample_loss(
        unet, schedule, prediction, latents, noise, timesteps, context, added,
    )?;
    let loss = match min_snr_gamma {
        None => per_sample.mean_all()?,
        Some(gamma) => {
            let b = timesteps.len();
            let w = min_snr_weights(schedule, prediction, gamma, timesteps);
            let w = Tensor::from_vec(w, b, latents.device())?.to_dtype(per_sample.dtype())?;
            (per_sample * w)?.mean_all()?
        }
    };
    Ok(loss)
}

/// The mean squared error of the UNet's prediction on noised `latents`
/// against the target, per sample: `[batch]` (f32, or f64 for f64 models).
#[allow(clippy::too_many_arguments)]
pub fn per_sample_loss(
    unet: &UNet2DConditionModel,
    schedule: &NoiseSchedule,
    prediction: PredictionType,
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
    Ok(diff.sqr()?.flatten_from(1)?.mean(1)?)
}

/// The Diffusion-DPO loss (Wallace et al., arXiv 2311.12908) of a batch of
/// preference pairs, from per-sample losses (`[2n]`: the n winners, then
/// their n losers, each pair at one noise and timestep) of the trained
/// model (`policy`) and of the frozen reference (`reference`, no graph):
///
/// `mean(-log sigmoid(-beta/2 * ((pw - pl) - (rw - rl))))`
///
/// Whatever lowers the error on winner and loser alike cancels; only the
/// gap between them is trained. Returns the scalar loss and the share of
/// pairs the policy already ranks better than the reference does.
pub fn dpo_loss(policy: &Tensor, reference: &Tensor, beta: f64) -> Result<(Tensor, f64)> {
    let n2 = policy.dim(0)?;
    ensure!(
        n2 % 2 == 0 && reference.dims() == policy.dims(),
        "DPO needs winner/loser losses of one shape, got {:?} and {:?}",
        policy.dims(),
        reference.dims()
    );
    let n = n2 / 2;
    let reference = reference.detach().to_dtype(policy.dtype())?;
    let gap = |l: &Tensor| -> Result<Tensor> { Ok((l.narrow(0, 0, n)? - l.narrow(0, n, n)?)?) };
    let inside = ((gap(policy)? - gap(&reference)?)? * (-0.5 * beta))?;
    // -log sigmoid(x) = softplus(-x) = relu(-x) + log(1 + exp(-|x|)).
    let softplus = (inside.neg()?.relu()? + (inside.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    let ahead: Vec<f64> = inside.to_dtype(DType::F64)?.to_vec1()?;
    let ahead = ahead.iter().filter(|&&x| x > 0.0).count() as f64 / n.max(1) as f64;
    Ok((softplus.mean_all()?, ahead))
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
