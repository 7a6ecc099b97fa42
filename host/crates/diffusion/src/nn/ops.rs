//! Differentiable activations, softmax and scaled dot-product attention.

use anyhow::Result;
use candle_core::{DType, Tensor, D};

/// Softmax over the last dimension: `exp(x - max) / sum`. Uses candle's fused
/// kernel only when `x` tracks no gradient (that kernel has no backward).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(candle_nn::ops::softmax_last_dim(x)?);
    }
    // Softmax is invariant to the subtracted constant, so the max needs no gradient.
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}

/// GELU with the exact erf formulation (diffusers' and OpenCLIP's `gelu`).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    Ok(x.gelu_erf()?)
}

/// GELU with the tanh approximation (`gelu_pytorch_tanh`).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    Ok(x.gelu()?)
}

/// CLIP's `quick_gelu`: `x * sigmoid(1.702 x)`, composed of differentiable ops.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    let sig = x.affine(-1.702, 0.0)?.exp()?.affine(1.0, 1.0)?.recip()?;
    Ok((x * sig)?)
}

/// SiLU / swish: `x * sigmoid(x)`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    Ok(x.silu()?)
}

/// An activation named by a transformers/diffusers config (`hidden_act`, `act_fn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `quick_gelu` (OpenAI CLIP).
    QuickGelu,
    /// exact erf GELU (`gelu`).
    GeluErf,
    /// tanh-approximated GELU (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// `silu` / `swish`.
    Silu,
}

impl Activation {
    /// Parses a config name (`quick_gelu`, `gelu`, `gelu_new`, `gelu_pytorch_tanh`, `silu`, `swish`).
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "quick_gelu" => Self::QuickGelu,
            "gelu" => Self::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "silu" | "swish" => Self::Silu,
            other => anyhow::bail!(
                "unsupported activation {other:?} (expected quick_gelu, gelu, gelu_new, gelu_pytorch_tanh or silu)"
            ),
        })
    }

    /// Applies the activation.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::QuickGelu => quick_gelu(x),
            Self::GeluErf => gelu_erf(x),
            Self::GeluTanh => gelu_tanh(x),
            Self::Silu => silu(x),
        }
    }
}

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
    let scores = (q.matmul(&k.t()?)? * scale)?;
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
