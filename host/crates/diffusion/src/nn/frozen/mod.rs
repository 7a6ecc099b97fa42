//! Frozen-weight fast path for training. candle's backward of `matmul` and
//! `conv2d` always computes the gradient of BOTH operands, so every frozen
//! base weight on the path from a LoRA adapter to the loss costs a
//! weight-sized gradient (extra matmul/conv work plus a buffer held in the
//! `GradStore`). Here the frozen product is computed outside the graph and
//! re-attached through a custom op whose backward returns only the input's
//! gradient: linear layers in `matmul`, convolutions in `conv`, and the
//! group/layer norms with a frozen affine in `norm`.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

pub mod conv;
pub mod matmul;
pub mod norm;

pub use conv::{conv2d_input_grad, frozen_conv2d, frozen_conv2d_bias};
pub use matmul::{frozen_linear, frozen_matmul_t};
pub use norm::{group_norm_frozen, layer_norm_frozen};

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
pub(crate) fn wanted(x: &Tensor, w: &Tensor) -> bool {
    frozen_fast_path() && x.track_op() && !w.track_op()
}

/// Which product a [`FrozenProduct`] re-attaches (its backward).
#[derive(Debug, Clone)]
pub(crate) enum Kind {
    /// `x · wᵀ`.
    Linear,
    /// `conv2d(x, w; padding, stride)`.
    Conv2d { padding: usize, stride: usize },
}

/// Forward: returns its second operand (the product computed off-graph).
/// Backward: the gradient of the first operand (the layer input) only.
pub(crate) struct FrozenProduct {
    /// The frozen weight (for the input gradient).
    pub(crate) weight: Tensor,
    /// Which product it is.
    pub(crate) kind: Kind,
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
                conv::conv2d_input_grad(grad_res, &w, arg1.dims4()?, padding, stride)
                    .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?
            }
        };
        Ok((Some(g), None))
    }
}
