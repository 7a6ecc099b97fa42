//! Frozen-weight fast path for training (written by the TRAINING engineer,
//! adopted by the NN owner; convolutions go through `conv_gemm`). candle's backward of `matmul` and `conv2d`
//! always computes the gradient of BOTH operands, so every frozen base weight
//! on the path from a LoRA adapter to the loss costs a weight-sized gradient
//! (extra matmul/conv work plus a buffer held in the `GradStore`). Here the
//! frozen product is computed outside the graph and re-attached through a
//! custom op whose backward returns only the input's gradient.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;

use super::conv_gemm::conv2d_gemm;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the fast path on or off process-wide (on by default; off reproduces
/// plain candle ops, for benchmarks and tests).
pub fn set_frozen_fast_path(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether the fast path is on.
pub fn frozen_fast_path() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Whether `x op w` should take the fast path: `x` is on a gradient path and
/// `w` is frozen (tracks nothing).
fn wanted(x: &Tensor, w: &Tensor) -> bool {
    frozen_fast_path() && x.track_op() && !w.track_op()
}

#[derive(Debug, Clone)]
enum Kind {
    Linear,
    Conv2d { padding: usize, stride: usize },
}

/// Forward: returns its second operand (the product computed off-graph).
/// Backward: the gradient of the first operand (the layer input) only.
struct FrozenProduct {
    weight: Tensor,
    kind: Kind,
}

fn copy_slice<T: Clone>(v: &[T], l: &Layout) -> candle_core::Result<Vec<T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(v[a..b].to_vec()),
        None => candle_core::bail!("frozen-product: precomputed output is not contiguous"),
    }
}

impl CustomOp2 for FrozenProduct {
    fn name(&self) -> &'static str {
        "frozen-product"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match s2 {
            CpuStorage::F32(v) => CpuStorage::F32(copy_slice(v, l2)?),
            CpuStorage::F64(v) => CpuStorage::F64(copy_slice(v, l2)?),
            CpuStorage::F16(v) => CpuStorage::F16(copy_slice(v, l2)?),
            CpuStorage::BF16(v) => CpuStorage::BF16(copy_slice(v, l2)?),
            _ => candle_core::bail!("frozen-product: unsupported dtype (f32/f64/f16/bf16 only)"),
        };
        Ok((out, l2.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s1: &candle_core::CudaStorage,
        _l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        match l2.contiguous_offsets() {
            Some((0, n)) if n == l2.shape().elem_count() => {
                Ok((s2.try_clone(l2)?, l2.shape().clone()))
            }
            _ => candle_core::bail!("frozen-product: precomputed output must be fresh"),
        }
    }

    fn bwd(
        &self,
        arg1: &Tensor,
        _arg2: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let w = self.weight.to_dtype(grad_res.dtype())?;
        let g = match self.kind {
            Kind::Linear => grad_res.matmul(&w)?,
            Kind::Conv2d { padding, stride } => {
                // As candle's own Conv2D backward for the input.
                let grad_h = grad_res.dim(2)?;
                let k_h = w.dim(2)?;
                let out_size = (grad_h - 1) * stride + (k_h - 1) + 1 - 2 * padding;
                let out_padding = arg1.dim(2)? - out_size;
                grad_res.conv_transpose2d(&w, padding, out_padding, stride, 1)?
            }
        };
        Ok((Some(g), None))
    }
}

/// `x [n, in] · wᵀ` (`w` `[out, in]`, same dtype as `x`); no gradient for `w`
/// when `w` is frozen.
pub fn frozen_matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !wanted(x, w) {
        return Ok(x.matmul(&w.t()?)?);
    }
    let y = x.detach().matmul(&w.t()?)?.contiguous()?;
    let op = FrozenProduct {
        weight: w.clone(),
        kind: Kind::Linear,
    };
    Ok(x.apply_op2(&y, op)?)
}

/// True when `conv_transpose2d` with one output padding (< stride) maps the
/// conv output's gradient back to exactly `x`'s height and width.
fn single_out_padding(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<bool> {
    let (_, _, h, wd) = x.dims4()?;
    let (_, _, kh, kw) = w.dims4()?;
    if kh != kw || h + 2 * padding < kh || wd + 2 * padding < kw {
        return Ok(false);
    }
    let oh = (h + 2 * padding - kh) / stride + 1;
    let ow = (wd + 2 * padding - kw) / stride + 1;
    let back_h = (oh - 1) * stride + kh;
    let back_w = (ow - 1) * stride + kw;
    if back_h < 2 * padding || back_w < 2 * padding {
        return Ok(false);
    }
    let (ph, pw) = (h + 2 * padding - back_h, wd + 2 * padding - back_w);
    Ok(ph == pw && ph < stride)
}

/// `conv2d(x, w; padding, stride)` (groups 1, dilation 1, `w` in `x`'s dtype);
/// no gradient for `w` when `w` is frozen.
/// Falls back to the plain (differentiable) op when the input gradient needs
/// different output paddings along H and W (odd/even sizes with stride 2),
/// which one `conv_transpose2d` cannot express.
pub fn frozen_conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    if !wanted(x, w) || !single_out_padding(x, w, padding, stride)? {
        return conv2d_gemm(x, w, padding, stride);
    }
    let y = conv2d_gemm(&x.detach(), w, padding, stride)?.contiguous()?;
    let op = FrozenProduct {
        weight: w.clone(),
        kind: Kind::Conv2d { padding, stride },
    };
    Ok(x.apply_op2(&y, op)?)
}
