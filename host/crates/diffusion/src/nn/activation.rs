//! Differentiable activations named by model configs (`Activation`), the
//! softmax over the last dimension and diffusers' GEGLU gate. On the CPU in
//! f32/f64 the softmax and the GEGLU gate run as fused kernels with a
//! hand-written backward (`super::fused`); elsewhere they are candle ops.

use anyhow::Result;
use candle_core::{Tensor, D};

use super::fused::{fused_ok, GegluErf, ScaledSoftmax};

/// Softmax over the last dimension: `exp(x - max) / sum`. Uses candle's fused
/// kernel only when `x` tracks no gradient (that kernel has no backward).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(candle_nn::ops::softmax_last_dim(x)?);
    }
    if fused_ok(x) {
        return Ok(x.apply_op1(ScaledSoftmax { scale: 1.0 })?);
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

/// diffusers' GEGLU gate on `[..., 2n]`: `h[..., :n] * gelu_erf(h[..., n:])`
/// -> `[..., n]`. One fused node on the CPU in f32/f64 (backward included);
/// composed of candle ops elsewhere.
pub fn geglu_erf(h: &Tensor) -> Result<Tensor> {
    let n2 = h.dim(D::Minus1)?;
    anyhow::ensure!(n2 % 2 == 0, "GEGLU needs an even last dimension, got {n2}");
    if fused_ok(h) {
        let h = h.contiguous()?;
        return Ok(h.apply_op1(GegluErf)?);
    }
    let n = n2 / 2;
    let gate = gelu_erf(&h.narrow(D::Minus1, n, n)?)?;
    Ok((h.narrow(D::Minus1, 0, n)? * gate)?)
}
