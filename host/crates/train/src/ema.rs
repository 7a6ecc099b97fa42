//! Exponential moving average of trained parameters (as diffusers'
//! `EMAModel`): after update `k` (1-based), `shadow -= (1 - d_k) (shadow - p)`
//! with `d_k = min(decay, (1 + s) / (10 + s))`, `s = k - 1` (the warm-up
//! ramp, diffusers' default: `d_1 = 0`, so the average starts at the first
//! trained weights), or `d_k = decay` without warm-up. The shadow is f32,
//! kept beside the master weights, saved in checkpoints and used for the output.

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor, Var};

/// EMA state over a list of variables.
#[derive(Debug, Clone)]
pub struct Ema {
    /// Target decay (e.g. 0.995).
    pub decay: f64,
    /// Ramp the decay up as diffusers does (`(1 + s) / (10 + s)`).
    pub warmup: bool,
    /// The averages, one per parameter (f32).
    pub shadow: Vec<Tensor>,
    /// Updates folded in so far.
    pub updates: u64,
}

impl Ema {
    /// Starts the averages at the parameters' current values.
    pub fn new(params: &[Var], decay: f64, warmup: bool) -> Result<Self> {
        ensure!(
            (0.0..1.0).contains(&decay),
            "ema_decay {decay} must be in [0, 1)"
        );
        let shadow = params
            .iter()
            .map(|p| Ok(p.as_tensor().to_dtype(DType::F32)?.copy()?.detach()))
            .collect::<Result<_>>()?;
        Ok(Self {
            decay,
            warmup,
            shadow,
            updates: 0,
        })
    }

    /// The decay used by update `k` (1-based).
    pub fn decay_at(&self, k: u64) -> f64 {
        if !self.warmup {
            return self.decay;
        }
        let s = k.saturating_sub(1) as f64;
        if s <= 0.0 {
            return 0.0;
        }
        ((1.0 + s) / (10.0 + s)).min(self.decay)
    }

    /// Folds the parameters' current values in (call after each optimizer update).
    pub fn update(&mut self, params: &[Var]) -> Result<()> {
        ensure!(
            params.len() == self.shadow.len(),
            "EMA: {} parameters for {} averages",
            params.len(),
            self.shadow.len()
        );
        self.updates += 1;
        let one_minus = 1.0 - self.decay_at(self.updates);
        for (s, p) in self.shadow.iter_mut().zip(params) {
            if p.device().is_cpu() && p.dtype() == DType::F32 {
                // One loop, the same f32 operations as the tensor path below.
                let om = one_minus as f32;
                let mut sv = s.flatten_all()?.to_vec1::<f32>()?;
                let pv = p.as_tensor().flatten_all()?.to_vec1::<f32>()?;
                for (a, b) in sv.iter_mut().zip(&pv) {
                    *a -= (*a - b) * om;
                }
                *s = Tensor::from_vec(sv, s.shape().clone(), s.device())?;
                continue;
            }
            let p = p.as_tensor().to_dtype(DType::F32)?;
            let diff = (&*s - &p)?;
            *s = (&*s - (diff * one_minus)?)?.detach();
        }
        Ok(())
    }
}

/// Copies of the variables' current values (to put back after a swap).
pub fn snapshot(params: &[Var]) -> Result<Vec<Tensor>> {
    params
        .iter()
        .map(|p| Ok(p.as_tensor().copy()?.detach()))
        .collect()
}

/// Writes `values[i]` into `params[i]` (converted to the variable's dtype).
pub fn assign(params: &[Var], values: &[Tensor]) -> Result<()> {
    ensure!(params.len() == values.len(), "assign: length mismatch");
    for (p, v) in params.iter().zip(values) {
        p.set(&v.to_dtype(p.dtype())?)?;
    }
    Ok(())
}
