//! Multi-head attention: splitting and merging heads, scaled dot-product
//! attention (query-chunked to bound the score block) and the causal mask.

use anyhow::Result;
use candle_core::{DType, Tensor};

use super::activation::softmax_last_dim;
use super::fused::{fused_ok, ScaledSoftmax};

/// `[B, L, heads*d]` -> `[B*heads, L, d]` (contiguous).
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, l, hd) = x.dims3()?;
    anyhow::ensure!(
        hd.is_multiple_of(heads),
        "width {hd} is not divisible by {heads} heads"
    );
    Ok(x.reshape((b, l, heads, hd / heads))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b * heads, l, hd / heads))?)
}

/// `[B*heads, L, d]` -> `[B, L, heads*d]` (contiguous).
pub fn merge_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (bh, l, d) = x.dims3()?;
    anyhow::ensure!(
        bh.is_multiple_of(heads),
        "batch*heads {bh} not divisible by {heads}"
    );
    Ok(x.reshape((bh / heads, heads, l, d))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((bh / heads, l, heads * d))?)
}

/// Largest attention-score block (elements) computed at once by [`attention`]:
/// 64 Mi elements = 256 MiB in f32. SD 1.5 at 512 px has 2x8x4096x4096 = 256 Mi
/// scores in its first self-attention; chunking the queries bounds that peak.
pub const ATTENTION_MAX_SCORES: usize = 64 << 20;

/// Scaled dot-product attention over `[N, Lq, d]` x `[N, Lk, d]` -> `[N, Lq, dv]`:
/// `softmax(q kᵀ · scale + mask) v`. `mask` is additive and broadcast to
/// `[N, Lq, Lk]` (e.g. `[1, Lq, Lk]` with `-inf` above the diagonal for causal).
/// Scores and softmax are computed in f32 when q is f16/bf16. Queries are
/// processed in chunks so no score block exceeds [`ATTENTION_MAX_SCORES`].
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    attention_chunked(q, k, v, mask, scale, ATTENTION_MAX_SCORES)
}

/// [`attention`] with an explicit bound on the score block size (elements).
pub fn attention_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    max_scores: usize,
) -> Result<Tensor> {
    let (n, lq, _) = q.dims3()?;
    let lk = k.dim(1)?;
    let rows = (max_scores / (n * lk).max(1)).max(1);
    if rows >= lq {
        return attention_block(q, k, v, mask, scale);
    }
    let mut outs = Vec::with_capacity(lq.div_ceil(rows));
    let mut start = 0;
    while start < lq {
        let len = rows.min(lq - start);
        let m = match mask {
            Some(m) if m.rank() == 3 && m.dim(1)? == lq => Some(m.narrow(1, start, len)?),
            Some(m) if m.rank() == 2 && m.dim(0)? == lq => Some(m.narrow(0, start, len)?),
            other => other.cloned(),
        };
        let qc = q.narrow(1, start, len)?.contiguous()?;
        outs.push(attention_block(&qc, k, v, m.as_ref(), scale)?);
        start += len;
    }
    Ok(Tensor::cat(&outs, 1)?)
}

fn attention_block(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let dtype = q.dtype();
    let raw = q.matmul(&k.t()?)?;
    if mask.is_none() && raw.track_op() && fused_ok(&raw) {
        // softmax(scale · q kᵀ) in one fused node.
        let probs = raw.apply_op1(ScaledSoftmax { scale })?;
        return Ok(probs.matmul(v)?);
    }
    let scores = (raw * scale)?;
    let scores = match dtype {
        DType::F16 | DType::BF16 => scores.to_dtype(DType::F32)?,
        _ => scores,
    };
    let scores = match mask {
        Some(m) => scores.broadcast_add(&m.to_dtype(scores.dtype())?)?,
        None => scores,
    };
    let probs = softmax_last_dim(&scores)?.to_dtype(dtype)?;
    Ok(probs.matmul(v)?)
}

/// Additive causal mask `[1, L, L]`: 0 on and below the diagonal, `-inf` above.
pub fn causal_mask(l: usize, dtype: DType, device: &candle_core::Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..l)
        .flat_map(|i| (0..l).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(m, (1, l, l), device)?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::testing::{max_diff, seq};
    use candle_core::{Device, Var};

    #[test]
    fn fused_attention_matches_masked_path() {
        // A zero mask takes the unfused path: both must agree, with gradients.
        let (q0, k0, v0) = (seq(&[2, 5, 4], 1), seq(&[2, 6, 4], 2), seq(&[2, 6, 3], 3));
        let c = seq(&[2, 5, 3], 4);
        let zero = Tensor::zeros((1, 5, 6), DType::F64, &Device::Cpu).unwrap();
        let run = |mask: Option<&Tensor>| {
            let (q, k, v) = (
                Var::from_tensor(&q0).unwrap(),
                Var::from_tensor(&k0).unwrap(),
                Var::from_tensor(&v0).unwrap(),
            );
            let o = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), mask, 0.5).unwrap();
            let g = (&o * &c).unwrap().sum_all().unwrap().backward().unwrap();
            let gs: Vec<Tensor> = [&q, &k, &v]
                .iter()
                .map(|t| g.get(t.as_tensor()).unwrap().clone())
                .collect();
            (o, gs)
        };
        let (o1, g1) = run(None);
        let (o2, g2) = run(Some(&zero));
        assert!(max_diff(&o1, &o2) < 1e-13);
        for (a, b) in g1.iter().zip(&g2) {
            assert!(max_diff(a, b) < 1e-12);
        }
    }
}
