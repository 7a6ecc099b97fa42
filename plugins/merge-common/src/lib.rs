//! Merge maths shared by the bundled merge-strategy plugins (`linear`, `cat`,
//! `svd`, `ties`, `dare`, `task-arithmetic`).
//!
//! Every strategy is written once here, generic over [`TensorOps`]: in a
//! plugin the ops are the host's fused tensor imports (the data never enters
//! the guest); in this crate's tests they are a small native reference
//! implementation, so the orchestration is checked against hand-computed
//! cases without a wasm runtime.
//!
//! Notation: expert `i` has `up_i` `[out, r_i]`, `down_i` `[r_i, in]`, scale
//! `s_i = alpha_i / r_i` and user weight `w_i`; its task vector (dense delta)
//! is `tau_i = s_i * up_i @ down_i`.

use std::fmt::Display;

/// The fused whole-tensor operations a strategy may use (the WIT `tensor`
/// interface). Errors are messages for the user.
pub trait TensorOps {
    /// The tensor handle.
    type T;
    /// Shape of a tensor.
    fn shape(&self, t: &Self::T) -> Vec<u32>;
    /// Element-wise `t * factor`.
    fn scale(&self, t: &Self::T, factor: f32) -> Self::T;
    /// Matrix product `[m,k] x [k,n] -> [m,n]`.
    fn matmul(&self, a: &Self::T, b: &Self::T) -> Result<Self::T, String>;
    /// Concatenate 2-D tensors along `dim` (0 rows, 1 columns).
    fn concat(&self, ts: &[&Self::T], dim: u32) -> Result<Self::T, String>;
    /// `sum_i weights[i] * ts[i]`.
    fn weighted_sum(&self, ts: &[&Self::T], weights: &[f32]) -> Result<Self::T, String>;
    /// Keep the `density` fraction of entries with the largest |x|.
    fn magnitude_prune(&self, t: &Self::T, density: f32) -> Result<Self::T, String>;
    /// Drop entries with probability `rate` (seeded), rescale kept ones by 1/(1-rate).
    fn random_drop(
        &self,
        t: &Self::T,
        rate: f32,
        seed: u64,
        rescale: bool,
    ) -> Result<Self::T, String>;
    /// TIES elect-sign and disjoint mean.
    fn sign_elect_mean(&self, ts: &[&Self::T]) -> Result<Self::T, String>;
    /// Truncated SVD `(up [m,r], down [r,n])`, singular values split by sqrt.
    fn svd_factors(&self, t: &Self::T, rank: u32) -> Result<(Self::T, Self::T), String>;
}

/// One expert's factors for the layer being merged.
pub struct Expert<'a, T> {
    /// `[out, r]` (peft `lora_B`).
    pub up: &'a T,
    /// `[r, in]` (peft `lora_A`).
    pub down: &'a T,
    /// `alpha / r`.
    pub scale: f32,
    /// The user's weight (1/K by default).
    pub weight: f32,
}

/// A strategy's result for one layer.
#[derive(Debug)]
pub enum Merged<T> {
    /// `(up [out, R], down [R, in])` whose product is the merged delta.
    Factors(T, T),
    /// The dense merged delta `[out, in]`; the host re-factors it by SVD.
    Delta(T),
}

/// DARE's combination step after the random drop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DareVariant {
    /// Weighted sum of the dropped task vectors.
    Linear,
    /// Elect sign and disjoint mean of the dropped task vectors (DARE-TIES).
    Ties,
}

impl DareVariant {
    /// Parse the `variant` parameter (`linear` or `ties`).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "linear" => Ok(Self::Linear),
            "ties" => Ok(Self::Ties),
            other => Err(format!(
                "param `variant`: unknown value {other:?}; use \"linear\" or \"ties\""
            )),
        }
    }
}

/// Prefix an error with the layer it happened on.
fn at<'a, E: Display>(layer: &'a str, what: &str) -> impl FnOnce(E) -> String + 'a {
    let what = what.to_string();
    move |e| format!("layer {layer}: {what}: {e}")
}

/// Reject an empty expert list and non-finite scales or weights.
pub fn check_experts<T>(layer: &str, experts: &[Expert<'_, T>]) -> Result<(), String> {
    if experts.is_empty() {
        return Err(format!("layer {layer}: no experts to merge"));
    }
    for (i, e) in experts.iter().enumerate() {
        if !e.scale.is_finite() || !e.weight.is_finite() {
            return Err(format!(
                "layer {layer}: expert {i} has a non-finite scale ({}) or weight ({})",
                e.scale, e.weight
            ));
        }
    }
    Ok(())
}

/// Exact factors of `gain * sum_i w_i tau_i`: `up = concat_cols(gain w_i s_i up_i)`,
/// `down = concat_rows(down_i)` (rank = sum of the experts' ranks).
pub fn concat_factors<O: TensorOps>(
    ops: &O,
    layer: &str,
    experts: &[Expert<'_, O::T>],
    gain: f32,
) -> Result<(O::T, O::T), String> {
    check_experts(layer, experts)?;
    let ups: Vec<O::T> = experts
        .iter()
        .map(|e| ops.scale(e.up, gain * e.weight * e.scale))
        .collect();
    let up_refs: Vec<&O::T> = ups.iter().collect();
    let down_refs: Vec<&O::T> = experts.iter().map(|e| e.down).collect();
    let up = ops
        .concat(&up_refs, 1)
        .map_err(at(layer, "concatenating the up factors"))?;
    let down = ops
        .concat(&down_refs, 0)
        .map_err(at(layer, "concatenating the down factors"))?;
    Ok((up, down))
}

/// Dense `gain * sum_i w_i tau_i`, computed as one matmul of the concatenated factors.
pub fn dense_sum<O: TensorOps>(
    ops: &O,
    layer: &str,
    experts: &[Expert<'_, O::T>],
    gain: f32,
) -> Result<O::T, String> {
    let (up, down) = concat_factors(ops, layer, experts, gain)?;
    ops.matmul(&up, &down)
        .map_err(at(layer, "multiplying the concatenated factors"))
}

/// Task vector `factor * s_i * up_i @ down_i` (the factor folded into the small `up`).
fn task_vector<O: TensorOps>(
    ops: &O,
    layer: &str,
    i: usize,
    e: &Expert<'_, O::T>,
    factor: f32,
) -> Result<O::T, String> {
    let up = ops.scale(e.up, factor * e.scale);
    ops.matmul(&up, e.down)
        .map_err(at(layer, &format!("expert {i}: up @ down")))
}

/// Weights normalised to mean 1 (`w_i * K / sum w`), so that TIES-style
/// disjoint means do not shrink with the default weights 1/K.
pub fn relative_weights<T>(layer: &str, experts: &[Expert<'_, T>]) -> Result<Vec<f32>, String> {
    let sum: f32 = experts.iter().map(|e| e.weight).sum();
    if sum.is_nan() || sum <= 0.0 {
        return Err(format!(
            "layer {layer}: the expert weights sum to {sum}; sign election needs a positive sum"
        ));
    }
    let k = experts.len() as f32;
    Ok(experts.iter().map(|e| e.weight * k / sum).collect())
}

/// `linear` / `task-arithmetic`: `gain * sum_i w_i tau_i`, exact factors when
/// no rank is requested, else the dense delta for the host to re-factor.
pub fn linear<O: TensorOps>(
    ops: &O,
    layer: &str,
    experts: &[Expert<'_, O::T>],
    rank: Option<u32>,
    gain: f32,
) -> Result<Merged<O::T>, String> {
    match rank {
        None => {
            let (up, down) = concat_factors(ops, layer, experts, gain)?;
            Ok(Merged::Factors(up, down))
        }
        Some(_) => Ok(Merged::Delta(dense_sum(ops, layer, experts, gain)?)),
    }
}

/// `cat`: always the exact concatenated factors (rank = sum of ranks).
pub fn cat<O: TensorOps>(
    ops: &O,
    layer: &str,
    experts: &[Expert<'_, O::T>],
) -> Result<Merged<O::T>, String> {
    let (up, down) = concat_factors(ops, layer, experts, 1.0)?;
    Ok(Merged::Factors(up, down))
}

/// The rank `svd` factors to: `param_rank` if > 0, else the requested rank,
/// else the largest expert rank; clipped to `min(out, in)`.
pub fn svd_rank<O: TensorOps>(
    ops: &O,
    experts: &[Expert<'_, O::T>],
    param_rank: i64,
    requested: Option<u32>,
) -> Result<u32, String> {
    if param_rank < 0 || param_rank > u32::MAX as i64 {
        return Err(format!(
            "param `rank`: {param_rank} is out of range; use 0 (the requested rank) or a positive rank"
        ));
    }
    let first_up = ops.shape(experts[0].up);
    let first_down = ops.shape(experts[0].down);
    let (out, inp) = (
        first_up.first().copied().unwrap_or(0),
        first_down.get(1).copied().unwrap_or(0),
    );
    let max_rank = experts
        .iter()
        .map(|e| ops.shape(e.down).first().copied().unwrap_or(0))
        .max()
        .unwrap_or(0);
    let r = if param_rank > 0 {
        param_rank as u32
    } else {
        requested.unwrap_or(max_rank)
    };
    Ok(r.min(out).min(inp).max(1))
}

/// `svd`: the dense weighted sum re-factored to a rank (see [`svd_rank`]).
pub fn svd<O: TensorOps>(
    ops: &O,
    layer: &str,
    experts: &[Expert<'_, O::T>],
    param_rank: i64,
    requested: Option<u32>,
) -> Result<Merged<O::T>, String> {
    check_experts(layer, experts)?;
    let r =
        svd_rank(ops, experts, param_rank, requested).map_err(|e| format!("layer {layer}: {e}"))?;
    let delta = dense_sum(ops, layer, experts, 1.0)?;
    let (up, down) = ops
        .svd_factors(&delta, r)
        .map_err(at(layer, &format!("SVD to rank {r}")))?;
    Ok(Merged::Factors(up, down))
}

/// Check a TIES `density` parameter: in (0, 1].
pub fn check_density(density: f64) -> Result<f32, String> {
    if density.is_finite() && density > 0.0 && density <= 1.0 {
        Ok(density as f32)
    } else {
        Err(format!(
            "param `density`: {density} is out of range; use a fraction in (0, 1], e.g. 0.2"
        ))
    }
}

/// Check a DARE `drop_rate` parameter: in [0, 1).
pub fn check_drop_rate(rate: f64) -> Result<f32, String> {
    if rate.is_finite() && (0.0..1.0).contains(&rate) {
        Ok(rate as f32)
    } else {
        Err(format!(
            "param `drop_rate`: {rate} is out of range; use a probability in [0, 1), e.g. 0.5"
        ))
    }
}

/// Check a `lambda` (or `gain`) parameter: finite.
pub fn check_factor(name: &str, x: f64) -> Result<f32, String> {
    if x.is_finite() {
        Ok(x as f32)
    } else {
        Err(format!("param `{name}`: {x} is not a finite number"))
    }
}

/// `ties`: `lambda * sign_elect_mean_i((w_i / mean w) * trim(tau_i, density))`.
pub fn ties<O: TensorOps>(
    ops: &O,
    layer: &str,
    experts: &[Expert<'_, O::T>],
    density: f32,
    lambda: f32,
) -> Result<Merged<O::T>, String> {
    check_experts(layer, experts)?;
    let rel = relative_weights(layer, experts)?;
    let mut trimmed = Vec::with_capacity(experts.len());
    for (i, (e, &r)) in experts.iter().zip(&rel).enumerate() {
        // Scaling by a constant does not change which entries are largest.
        let tau = task_vector(ops, layer, i, e, r)?;
        let t = if density < 1.0 {
            ops.magnitude_prune(&tau, density)
                .map_err(at(layer, &format!("expert {i}: trim to density {density}")))?
        } else {
            tau
        };
        trimmed.push(t);
    }
    elect_and_scale(ops, layer, &trimmed, lambda)
}

/// Sign election + disjoint mean, then `* lambda`.
fn elect_and_scale<O: TensorOps>(
    ops: &O,
    layer: &str,
    ts: &[O::T],
    lambda: f32,
) -> Result<Merged<O::T>, String> {
    let refs: Vec<&O::T> = ts.iter().collect();
    let m = ops
        .sign_elect_mean(&refs)
        .map_err(at(layer, "sign election"))?;
    Ok(Merged::Delta(if lambda == 1.0 {
        m
    } else {
        ops.scale(&m, lambda)
    }))
}

/// `dare`: drop each task vector's entries with probability `rate` (rescaled
/// by 1/(1-rate)), then a weighted sum (`Linear`) or TIES election (`Ties`),
/// times `lambda`. `seed(i)` gives expert `i`'s drop seed for this layer.
pub fn dare<O: TensorOps>(
    ops: &O,
    layer: &str,
    experts: &[Expert<'_, O::T>],
    rate: f32,
    variant: DareVariant,
    lambda: f32,
    seed: impl Fn(usize) -> u64,
) -> Result<Merged<O::T>, String> {
    check_experts(layer, experts)?;
    let factors: Vec<f32> = match variant {
        DareVariant::Linear => vec![1.0; experts.len()],
        DareVariant::Ties => relative_weights(layer, experts)?,
    };
    let mut dropped = Vec::with_capacity(experts.len());
    for (i, (e, &f)) in experts.iter().zip(&factors).enumerate() {
        let tau = task_vector(ops, layer, i, e, f)?;
        let d = if rate > 0.0 {
            ops.random_drop(&tau, rate, seed(i), true).map_err(at(
                layer,
                &format!("expert {i}: random drop at rate {rate}"),
            ))?
        } else {
            tau
        };
        dropped.push(d);
    }
    match variant {
        DareVariant::Linear => {
            let refs: Vec<&O::T> = dropped.iter().collect();
            let w: Vec<f32> = experts.iter().map(|e| lambda * e.weight).collect();
            let m = ops
                .weighted_sum(&refs, &w)
                .map_err(at(layer, "weighted sum"))?;
            Ok(Merged::Delta(m))
        }
        DareVariant::Ties => elect_and_scale(ops, layer, &dropped, lambda),
    }
}

/// SplitMix64 finaliser: a well-mixed 64-bit hash of `x` (`selma-rng`'s).
pub use selma_rng::splitmix64;

/// FNV-1a 64-bit hash of a string.
pub fn fnv1a64(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Drop seed of expert `i` on `layer`, from the plugin's base seed (its first
/// host random draw): independent of the order in which layers are merged.
pub fn layer_seed(base: u64, layer: &str, i: usize) -> u64 {
    splitmix64(base ^ fnv1a64(layer) ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

#[cfg(test)]
mod reference;
#[cfg(test)]
mod tests;

#[cfg(feature = "sdk")]
pub mod sdk;
