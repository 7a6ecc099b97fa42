//! Optimisation: AdamW with decoupled weight decay and bias correction (as
//! `torch.optim.AdamW`), global L2 gradient-norm clipping (as
//! `torch.nn.utils.clip_grad_norm_`), diffusers' learning-rate schedules
//! (`get_scheduler`: constant, constant-with-warmup, cosine-with-warmup) and
//! gradient accumulation (mean of micro-batch gradients, as accelerate).
//! On the CPU, AdamW runs as one fused loop per parameter (the same f32
//! operations in the same order as the tensor path, so the same bits; a full
//! fine-tune of a few million weights spends far less time in the update).

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

/// AdamW hyper-parameters (SELMA: betas (0.9, 0.999), eps 1e-8, decay 1e-2).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// `beta1`.
    pub beta1: f64,
    /// `beta2`.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay (multiplied by the learning rate).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

/// AdamW over a list of f32 variables; moments kept in f32 beside them.
#[derive(Debug)]
pub struct AdamW {
    /// Hyper-parameters.
    pub config: AdamWConfig,
    /// The trained variables.
    pub params: Vec<Var>,
    /// First moments (`exp_avg`), one per parameter.
    pub m: Vec<Tensor>,
    /// Second moments (`exp_avg_sq`), one per parameter.
    pub v: Vec<Tensor>,
    /// Updates applied so far (torch's `state["step"]`).
    pub step: u64,
    /// Use the fused loop for f32 CPU parameters (on by default; off: tensor ops everywhere).
    pub fused: bool,
}

/// The per-update constants of AdamW, as the f32 values the tensor path multiplies with.
#[derive(Debug, Clone, Copy)]
struct Consts {
    b1: f32,
    omb1: f32,
    b2: f32,
    omb2: f32,
    decay: f32,
    inv_bc2: f32,
    eps: f32,
    step: f32,
}

/// AdamW on slices: exactly the f32 arithmetic of the tensor path (candle's
/// `x * c` and `x / c` are `x * (c as f32)` and `x * ((1/c) as f32)`, `x + c` is `x + (c as f32)`).
fn fused_update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: Consts) {
    for i in 0..p.len() {
        let gi = g[i];
        let mi = m[i] * k.b1 + gi * k.omb1;
        let vi = v[i] * k.b2 + (gi * gi) * k.omb2;
        let decayed = p[i] * k.decay;
        let denom = vi.sqrt() * k.inv_bc2 + k.eps;
        p[i] = decayed - (mi / denom) * k.step;
        m[i] = mi;
        v[i] = vi;
    }
}

fn to_f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

impl AdamW {
    /// Zero moments for `params` (which must be f32).
    pub fn new(params: Vec<Var>, config: AdamWConfig) -> Result<Self> {
        let mut m = Vec::with_capacity(params.len());
        for (i, p) in params.iter().enumerate() {
            ensure!(
                p.dtype() == DType::F32,
                "AdamW: parameter {i} is {:?}; master weights must be f32",
                p.dtype()
            );
            m.push(p.zeros_like()?);
        }
        let v = m.clone();
        Ok(Self {
            config,
            params,
            m,
            v,
            step: 0,
            fused: true,
        })
    }

    /// One update with learning rate `lr`; `grads[i]` belongs to `params[i]`
    /// (`None`: no gradient this step, the parameter is left alone as torch does).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        ensure!(
            grads.len() == self.params.len(),
            "AdamW: {} gradients for {} parameters",
            grads.len(),
            self.params.len()
        );
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        for (i, g) in grads.iter().enumerate() {
            let Some(g) = g else { continue };
            let g = g.to_dtype(DType::F32)?;
            let p = &self.params[i];
            ensure!(
                g.dims() == p.dims(),
                "AdamW: gradient {:?} for parameter {:?}",
                g.dims(),
                p.dims()
            );
            if self.fused && p.device().is_cpu() && self.m[i].dtype() == DType::F32 {
                let k = Consts {
                    b1: c.beta1 as f32,
                    omb1: (1.0 - c.beta1) as f32,
                    b2: c.beta2 as f32,
                    omb2: (1.0 - c.beta2) as f32,
                    decay: (1.0 - lr * c.weight_decay) as f32,
                    inv_bc2: (1.0 / bc2_sqrt) as f32,
                    eps: c.eps as f32,
                    step: (lr / bc1) as f32,
                };
                let mut pv = to_f32_vec(p.as_tensor())?;
                let gv = to_f32_vec(&g)?;
                let mut mv = to_f32_vec(&self.m[i])?;
                let mut vv = to_f32_vec(&self.v[i])?;
                fused_update(&mut pv, &gv, &mut mv, &mut vv, k);
                let shape = p.shape().clone();
                let dev = p.device().clone();
                p.set(&Tensor::from_vec(pv, shape.clone(), &dev)?)
                    .with_context(|| format!("AdamW: updating parameter {i}"))?;
                self.m[i] = Tensor::from_vec(mv, shape.clone(), &dev)?;
                self.v[i] = Tensor::from_vec(vv, shape, &dev)?;
                continue;
            }
            let m = ((&self.m[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let decayed = (p.as_tensor() * (1.0 - lr * c.weight_decay))?;
            let denom = ((v.sqrt()? / bc2_sqrt)? + c.eps)?;
            let new_p = (decayed - ((&m / denom)? * (lr / bc1))?)?;
            p.set(&new_p.detach())
                .with_context(|| format!("AdamW: updating parameter {i}"))?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// Scales `grads` in place so their global L2 norm is at most `max_norm`
/// (torch: `coef = min(1, max_norm / (norm + 1e-6))`); returns the norm
/// before clipping. Non-finite norms are returned unclipped for the caller to handle.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter().flatten() {
        sq += g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    let norm = sq.sqrt();
    if !norm.is_finite() {
        return Ok(norm);
    }
    let coef = (max_norm / (norm + 1e-6)).min(1.0);
    if coef < 1.0 {
        for g in grads.iter_mut().flatten() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}

/// diffusers' learning-rate schedules; `factor(k)` multiplies the base rate
/// of update `k` (0-based: the first update uses `factor(0)`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LrSchedule {
    /// `1`.
    Constant,
    /// `k / warmup` during warm-up, then `1`.
    ConstantWithWarmup {
        /// Warm-up updates.
        warmup: u64,
    },
    /// Linear warm-up, then `max(0, 0.5 (1 + cos(pi * 2 * cycles * progress)))`.
    CosineWithWarmup {
        /// Warm-up updates.
        warmup: u64,
        /// Total updates.
        total: u64,
        /// Number of cosine half-waves times 0.5 (diffusers' default 0.5).
        cycles: f64,
    },
}

impl LrSchedule {
    /// Parses `constant`, `constant_with_warmup`, `cosine` (with `warmup` and `total`).
    pub fn parse(name: &str, warmup: u64, total: u64) -> Result<Self> {
        Ok(match name.replace('-', "_").as_str() {
            "constant" => Self::Constant,
            "constant_with_warmup" => Self::ConstantWithWarmup { warmup },
            "cosine" | "cosine_with_warmup" => Self::CosineWithWarmup {
                warmup,
                total,
                cycles: 0.5,
            },
            other => anyhow::bail!(
                "unknown --lr-schedule {other:?}: use constant, constant_with_warmup or cosine"
            ),
        })
    }

    /// The multiplier of the base learning rate at update `k`.
    pub fn factor(&self, k: u64) -> f64 {
        let warm = |w: u64| k as f64 / (w.max(1)) as f64;
        match *self {
            Self::Constant => 1.0,
            Self::ConstantWithWarmup { warmup } => {
                if k < warmup {
                    warm(warmup)
                } else {
                    1.0
                }
            }
            Self::CosineWithWarmup {
                warmup,
                total,
                cycles,
            } => {
                if k < warmup {
                    return warm(warmup);
                }
                let progress = (k - warmup) as f64 / (total.saturating_sub(warmup).max(1)) as f64;
                (0.5 * (1.0 + (std::f64::consts::PI * cycles * 2.0 * progress).cos())).max(0.0)
            }
        }
    }
}

/// Sums micro-batch gradients; `take` returns their mean (divided by the
/// number of micro-batches added) and resets.
#[derive(Debug, Default)]
pub struct GradAccumulator {
    sums: Vec<Option<Tensor>>,
    count: usize,
}

impl GradAccumulator {
    /// An empty accumulator.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one micro-batch's gradients (f32).
    pub fn add(&mut self, grads: Vec<Option<Tensor>>) -> Result<()> {
        if self.count == 0 {
            self.sums = grads
                .into_iter()
                .map(|g| g.map(|g| g.to_dtype(DType::F32)).transpose())
                .collect::<candle_core::Result<_>>()?;
        } else {
            ensure!(
                grads.len() == self.sums.len(),
                "gradient accumulation: {} gradients, expected {}",
                grads.len(),
                self.sums.len()
            );
            for (s, g) in self.sums.iter_mut().zip(grads) {
                if let Some(g) = g {
                    let g = g.to_dtype(DType::F32)?;
                    *s = Some(match s.take() {
                        Some(acc) => (acc + g)?,
                        None => g,
                    });
                }
            }
        }
        self.count += 1;
        Ok(())
    }

    /// Micro-batches added since the last `take`.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The mean gradients; resets the accumulator.
    pub fn take(&mut self) -> Result<Vec<Option<Tensor>>> {
        ensure!(self.count > 0, "gradient accumulation: nothing accumulated");
        let n = self.count as f64;
        self.count = 0;
        if n == 1.0 {
            // x / 1 == x: skip a copy of every gradient.
            return Ok(std::mem::take(&mut self.sums));
        }
        std::mem::take(&mut self.sums)
            .into_iter()
            .map(|g| g.map(|g| Ok((g / n)?)).transpose())
            .collect()
    }
}
