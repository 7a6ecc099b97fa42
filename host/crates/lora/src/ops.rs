//! Fused f32 tensor operations that merge strategies are built from. The
//! runtime's `tensor` resource (the plugins' view) and the [`crate::native`]
//! strategies both call these, so a plugin and its native twin compute the
//! same numbers. Every function takes and returns f32 candle tensors and
//! computes on the CPU (results go back to the inputs' device).

use crate::rng::SplitMix64;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor};

fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

fn like(t: &Tensor, data: Vec<f32>) -> Result<Tensor> {
    Ok(Tensor::from_vec(data, t.dims(), t.device())?)
}

fn same_shapes(tensors: &[&Tensor], what: &str) -> Result<()> {
    ensure!(!tensors.is_empty(), "{what}: no tensors given");
    let s0 = tensors[0].dims();
    for (i, t) in tensors.iter().enumerate().skip(1) {
        ensure!(
            t.dims() == s0,
            "{what}: tensor {i} has shape {:?}, tensor 0 has {s0:?}",
            t.dims()
        );
    }
    Ok(())
}

/// `sum_i weights[i] * tensors[i]` for tensors of equal shape.
pub fn weighted_sum(tensors: &[&Tensor], weights: &[f32]) -> Result<Tensor> {
    same_shapes(tensors, "weighted_sum")?;
    ensure!(
        tensors.len() == weights.len(),
        "weighted_sum: {} tensors but {} weights",
        tensors.len(),
        weights.len()
    );
    let mut acc = vec![0f32; tensors[0].elem_count()];
    for (t, &w) in tensors.iter().zip(weights) {
        for (a, x) in acc.iter_mut().zip(values(t)?) {
            *a += w * x;
        }
    }
    like(tensors[0], acc)
}

/// Number of entries `magnitude_prune` keeps: round(density * n), at least 1
/// for a non-empty tensor.
pub fn kept_count(n: usize, density: f32) -> usize {
    ((density as f64 * n as f64).round() as usize).clamp(n.min(1), n)
}

/// TIES "trim": keep the `density` fraction of entries with the largest |x|
/// ([`kept_count`] of them), zero the rest. Ties at the threshold keep the
/// entries with the lowest (row-major) index, so the result is deterministic.
pub fn magnitude_prune(t: &Tensor, density: f32) -> Result<Tensor> {
    ensure!(
        density > 0.0 && density <= 1.0,
        "magnitude_prune: density must be in (0, 1], got {density}"
    );
    let mut v = values(t)?;
    let n = v.len();
    let k = kept_count(n, density);
    if k == n {
        return like(t, v);
    }
    let mut mags: Vec<f32> = v.iter().map(|x| x.abs()).collect();
    // The k-th largest magnitude.
    let (_, &mut threshold, _) = mags.select_nth_unstable_by(n - k, |a, b| a.total_cmp(b));
    let greater = v.iter().filter(|x| x.abs() > threshold).count();
    let mut equal_left = k - greater;
    for x in v.iter_mut() {
        let a = x.abs();
        if a > threshold {
            continue;
        }
        if a == threshold && equal_left > 0 {
            equal_left -= 1;
            continue;
        }
        *x = 0.0;
    }
    like(t, v)
}

/// DARE: drop each entry with probability `rate` and, with `rescale`, scale
/// the kept ones by 1 / (1 - rate). Draws one SplitMix64 number per entry in
/// row-major order from `seed` (entry dropped when u < rate), so a seed always
/// gives the same mask.
pub fn random_drop(t: &Tensor, rate: f32, seed: u64, rescale: bool) -> Result<Tensor> {
    ensure!(
        (0.0..1.0).contains(&rate),
        "random_drop: rate must be in [0, 1), got {rate}"
    );
    let mut v = values(t)?;
    let mut rng = SplitMix64::new(seed);
    let keep_scale = if rescale { 1.0 / (1.0 - rate) } else { 1.0 };
    for x in v.iter_mut() {
        if rng.next_f64() < rate as f64 {
            *x = 0.0;
        } else {
            *x *= keep_scale;
        }
    }
    like(t, v)
}

/// TIES "elect and disjoint merge": per entry, the elected sign is the sign
/// of the sum of the inputs; the result is the mean of the non-zero inputs
/// with that sign (0 where the sum is 0 or none agrees).
pub fn sign_elect_mean(tensors: &[&Tensor]) -> Result<Tensor> {
    same_shapes(tensors, "sign_elect_mean")?;
    let vals: Vec<Vec<f32>> = tensors.iter().map(|t| values(t)).collect::<Result<_>>()?;
    let n = vals[0].len();
    let mut out = vec![0f32; n];
    for (j, o) in out.iter_mut().enumerate() {
        let sum: f32 = vals.iter().map(|v| v[j]).sum();
        if sum == 0.0 {
            continue;
        }
        let positive = sum > 0.0;
        let (mut acc, mut count) = (0f32, 0u32);
        for v in &vals {
            let x = v[j];
            if x != 0.0 && (x > 0.0) == positive {
                acc += x;
                count += 1;
            }
        }
        if count > 0 {
            *o = acc / count as f32;
        }
    }
    like(tensors[0], out)
}

/// Concatenate 2-D tensors along `dim` (0: rows, 1: columns).
pub fn concat(tensors: &[&Tensor], dim: usize) -> Result<Tensor> {
    ensure!(!tensors.is_empty(), "concat: no tensors given");
    ensure!(dim < 2, "concat: dim must be 0 or 1, got {dim}");
    for (i, t) in tensors.iter().enumerate() {
        ensure!(
            t.rank() == 2,
            "concat: tensor {i} has shape {:?}, want 2-D",
            t.dims()
        );
    }
    Tensor::cat(tensors, dim).context("concat")
}

/// Truncated SVD of a 2-D tensor [m, n]: (up [m, r], down [r, n]) with
/// up @ down the best rank-r approximation (Eckart-Young), r = min(rank, m, n),
/// singular values split evenly: up = U_r sqrt(S_r), down = sqrt(S_r) V_r^T.
/// Computed in f64 with faer's thin SVD.
pub fn svd_factors(t: &Tensor, rank: usize) -> Result<(Tensor, Tensor)> {
    let (up, s, down) = truncated_svd(t, rank)?;
    let r = s.len();
    let (m, n) = t.dims2()?;
    let mut u = vec![0f32; m * r];
    for i in 0..m {
        for j in 0..r {
            u[i * r + j] = (up[i * r + j] * s[j].sqrt()) as f32;
        }
    }
    let mut d = vec![0f32; r * n];
    for i in 0..r {
        let w = s[i].sqrt();
        for j in 0..n {
            d[i * n + j] = (down[i * n + j] * w) as f32;
        }
    }
    Ok((
        Tensor::from_vec(u, (m, r), t.device())?,
        Tensor::from_vec(d, (r, n), t.device())?,
    ))
}

/// Singular values of a 2-D tensor, descending (f64).
pub fn singular_values(t: &Tensor) -> Result<Vec<f64>> {
    let a = to_faer(t)?;
    a.singular_values()
        .map_err(|e| anyhow::anyhow!("SVD did not converge: {e:?}"))
}

fn to_faer(t: &Tensor) -> Result<faer::Mat<f64>> {
    let (m, n) = t
        .dims2()
        .with_context(|| format!("SVD needs a 2-D tensor, got shape {:?}", t.dims()))?;
    let v = values(t)?;
    if v.iter().any(|x| !x.is_finite()) {
        bail!("SVD input has non-finite values (NaN or inf)");
    }
    Ok(faer::Mat::from_fn(m, n, |i, j| v[i * n + j] as f64))
}

/// (U_r row-major [m, r], S_r, V_r^T row-major [r, n]) in f64.
fn truncated_svd(t: &Tensor, rank: usize) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    let a = to_faer(t)?;
    let (m, n) = (a.nrows(), a.ncols());
    let r = rank.min(m).min(n);
    let svd = a
        .thin_svd()
        .map_err(|e| anyhow::anyhow!("SVD did not converge: {e:?}"))?;
    let (u, s, v) = (svd.U(), svd.S().column_vector(), svd.V());
    let mut up = vec![0f64; m * r];
    for i in 0..m {
        for j in 0..r {
            up[i * r + j] = u[(i, j)];
        }
    }
    let sv: Vec<f64> = (0..r).map(|j| s[j]).collect();
    let mut down = vec![0f64; r * n];
    for i in 0..r {
        for j in 0..n {
            down[i * n + j] = v[(j, i)];
        }
    }
    Ok((up, sv, down))
}
