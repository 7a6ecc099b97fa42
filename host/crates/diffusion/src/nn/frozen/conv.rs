//! Convolutions with a frozen weight (and bias): the forward is
//! `conv2d_gemm` off-graph, the backward only the input's gradient, on the
//! CPU one GEMM plus a col2im.

use anyhow::{ensure, Result};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, WithDType};

use super::{wanted, FrozenProduct, Kind};
use crate::nn::conv_gemm::conv2d_gemm;

/// [`frozen_conv2d`] plus a frozen bias `b` `[out]` added off-graph (see
/// [`frozen_linear`]).
pub fn frozen_conv2d_bias(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let b_frozen = b.is_none_or(|b| !b.track_op());
    if !wanted(x, w) || !b_frozen {
        let y = frozen_conv2d(x, w, padding, stride)?;
        return Ok(match b {
            Some(b) => y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?)?,
            None => y,
        });
    }
    let mut y = frozen_conv_forward(&x.detach(), w, padding, stride)?;
    if let Some(b) = b {
        y = y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?)?;
    }
    let op = FrozenProduct {
        weight: w.clone(),
        kind: Kind::Conv2d { padding, stride },
    };
    Ok(x.apply_op2(&y, op)?)
}

/// Input gradient of `y = conv2d(x, w; padding, stride)` for `x` of shape
/// `x_dims`, given `dL/dy` `[B, O, oh, ow]`: one GEMM `wᵀ · g` over the
/// weight viewed as `[O, C*kh*kw]` (read in place, nothing copied), then a
/// col2im that adds every kernel tap's rows back at its input pixels. On the
/// CPU this replaces candle's direct-loop `conv_transpose2d`, which was ~45%
/// of a LoRA training step; other devices keep `conv_transpose2d`.
pub fn conv2d_input_grad(
    grad: &Tensor,
    w: &Tensor,
    x_dims: (usize, usize, usize, usize),
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let (b, c, h, wd) = x_dims;
    let (gb, o, oh, ow) = grad.dims4()?;
    let (wo, wc, kh, kw) = w.dims4()?;
    ensure!(
        gb == b && wo == o && wc == c,
        "conv input gradient: grad {:?}, weight {:?}, input {x_dims:?}",
        grad.dims(),
        w.dims()
    );
    if !grad.device().is_cpu() {
        return transpose_conv_input_grad(grad, w, x_dims, padding, stride);
    }
    let w = if w.is_contiguous() {
        w.clone()
    } else {
        w.contiguous()?
    };
    let wm = w.reshape((o, c * kh * kw))?;
    let gm = grad
        .transpose(0, 1)?
        .contiguous()?
        .reshape((o, b * oh * ow))?;
    let col = wm.t()?.matmul(&gm)?;
    if kh == 1 && kw == 1 && padding == 0 && stride == 1 {
        return Ok(col.reshape((c, b, h, wd))?.transpose(0, 1)?.contiguous()?);
    }
    let geom = Col2Im::new((b, c, h, wd), (kh, kw), padding, stride);
    Ok(col.apply_op1_no_bwd(&geom)?)
}

/// The device-generic fallback: candle's `conv_transpose2d` (needs one output
/// padding for both axes).
fn transpose_conv_input_grad(
    grad: &Tensor,
    w: &Tensor,
    x_dims: (usize, usize, usize, usize),
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let (_, _, oh, ow) = grad.dims4()?;
    let (_, _, kh, kw) = w.dims4()?;
    let (_, _, h, wd) = x_dims;
    let back_h = (oh - 1) * stride + kh;
    let back_w = (ow - 1) * stride + kw;
    ensure!(
        kh == kw && h + 2 * padding >= back_h && wd + 2 * padding >= back_w,
        "conv input gradient: kernel {kh}x{kw} on {h}x{wd} not supported off the CPU"
    );
    let (ph, pw) = (h + 2 * padding - back_h, wd + 2 * padding - back_w);
    ensure!(
        ph == pw,
        "conv input gradient: {h}x{wd} input with stride {stride} needs two output paddings"
    );
    Ok(grad.conv_transpose2d(w, padding, ph, stride, 1)?)
}

/// col2im: `[C*kh*kw, B*oh*ow]` (rows in the weight's `(c, i, j)` order) ->
/// `[B, C, H, W]`, each entry added at input pixel `(o*stride + i - padding)`.
#[derive(Debug, Clone, Copy)]
struct Col2Im {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    padding: usize,
    stride: usize,
}

impl Col2Im {
    /// The geometry of a conv of `[b, c, h, w]` with a `kh x kw` kernel
    /// (the padded input must be at least the kernel's size).
    fn new(
        x: (usize, usize, usize, usize),
        k: (usize, usize),
        padding: usize,
        stride: usize,
    ) -> Self {
        let ((b, c, h, w), (kh, kw)) = (x, k);
        Col2Im {
            b,
            c,
            h,
            w,
            kh,
            kw,
            oh: (h + 2 * padding - kh) / stride + 1,
            ow: (w + 2 * padding - kw) / stride + 1,
            padding,
            stride,
        }
    }

    /// Calls `f(col_start, x_start, len)` for every run of `len` taps of one
    /// kernel offset along one output row: column entries `col_start + t`
    /// pair with input entries `x_start + t * stride` (`[B, C, H, W]` layout),
    /// skipping taps that fall into the padding.
    fn walk(&self, mut f: impl FnMut(usize, usize, usize)) {
        let Col2Im {
            b,
            c,
            h,
            w,
            kh,
            kw,
            oh,
            ow,
            padding,
            stride,
        } = *self;
        let n = b * oh * ow;
        // Output positions whose input position `o*stride + k - padding` is in range.
        let range = |k: usize, len: usize, olen: usize| -> (usize, usize) {
            let lo = padding.saturating_sub(k).div_ceil(stride);
            let hi = ((len + padding).saturating_sub(k))
                .div_ceil(stride)
                .min(olen);
            (lo, hi.max(lo))
        };
        for ci in 0..c {
            for i in 0..kh {
                let (y0, y1) = range(i, h, oh);
                for j in 0..kw {
                    let (x0, x1) = range(j, w, ow);
                    let row = ((ci * kh + i) * kw + j) * n;
                    for bi in 0..b {
                        for oy in y0..y1 {
                            let y = oy * stride + i - padding;
                            let col_start = row + (bi * oh + oy) * ow + x0;
                            let x_start = ((bi * c + ci) * h + y) * w + x0 * stride + j - padding;
                            f(col_start, x_start, x1 - x0);
                        }
                    }
                }
            }
        }
    }

    fn run<T: WithDType>(&self, col: &[T]) -> Vec<T> {
        let s = self.stride;
        let mut out = vec![T::zero(); self.b * self.c * self.h * self.w];
        self.walk(|cs, xs, len| {
            for (t, &v) in col[cs..cs + len].iter().enumerate() {
                out[xs + t * s] += v;
            }
        });
        out
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let rows = self.c * self.kh * self.kw;
        let n = self.b * self.oh * self.ow;
        let (a, e) = match l.contiguous_offsets() {
            Some(o) if l.shape().dims() == [rows, n] => o,
            _ => candle_core::bail!("col2im: expected a contiguous [{rows}, {n}] matrix"),
        };
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(self.run(&v[a..e])),
            CpuStorage::F64(v) => CpuStorage::F64(self.run(&v[a..e])),
            CpuStorage::F16(v) => CpuStorage::F16(self.run(&v[a..e])),
            CpuStorage::BF16(v) => CpuStorage::BF16(self.run(&v[a..e])),
            _ => candle_core::bail!("col2im: unsupported dtype (f32/f64/f16/bf16 only)"),
        };
        Ok((out, Shape::from((self.b, self.c, self.h, self.w))))
    }
}

/// The off-graph forward of [`frozen_conv2d`]: [`conv2d_gemm`] (the one
/// im2col), made contiguous `[B, O, oh, ow]`.
fn frozen_conv_forward(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    Ok(conv2d_gemm(x, w, padding, stride)?.contiguous()?)
}

/// `conv2d(x, w; padding, stride)` (groups 1, dilation 1, `w` in `x`'s dtype);
/// no gradient for `w` when `w` is frozen.
pub fn frozen_conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    if !wanted(x, w) {
        return conv2d_gemm(x, w, padding, stride);
    }
    let y = frozen_conv_forward(&x.detach(), w, padding, stride)?;
    let op = FrozenProduct {
        weight: w.clone(),
        kind: Kind::Conv2d { padding, stride },
    };
    Ok(x.apply_op2(&y, op)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::testing::{max_diff, seq};
    use candle_core::{DType, Device, Var};

    /// The GEMM + col2im input gradient equals central differences of
    /// candle's conv2d (exact: the loss is linear in x), for odd, even and
    /// rectangular sizes, strides 1-3, paddings 0-2, kernels 1-3, and is what
    /// the frozen op's backward returns (with no weight gradient); the frozen
    /// op's forward (`conv2d_gemm`'s im2col) equals candle's conv2d.
    #[test]
    fn conv_input_grad_matches_finite_differences() {
        for &(b, c, h, wd, o, k, pad, stride) in &[
            (2, 3, 5, 5, 4, 3, 1, 1),
            (1, 2, 6, 6, 3, 3, 1, 2),
            (2, 2, 7, 6, 3, 3, 1, 2),
            (1, 3, 7, 7, 2, 3, 0, 2),
            (1, 2, 5, 8, 3, 3, 2, 1),
            (2, 3, 6, 5, 4, 1, 0, 1),
            (1, 2, 7, 7, 3, 1, 0, 2),
            (1, 2, 9, 8, 2, 2, 1, 3),
        ] {
            let x0 = seq(&[b, c, h, wd], 1);
            let w = seq(&[o, c, k, k], 2);
            let y = x0.conv2d(&w, pad, stride, 1, 1).unwrap();
            let g = seq(y.dims(), 3);
            let got = conv2d_input_grad(&g, &w, (b, c, h, wd), pad, stride).unwrap();
            assert_eq!(got.dims(), x0.dims());
            // Finite differences of sum(g ⊙ conv(x)): linear in x, so exact up to rounding.
            let base = x0.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let gv = got.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let loss = |v: Vec<f64>| -> f64 {
                let t = Tensor::from_vec(v, (b, c, h, wd), &Device::Cpu).unwrap();
                (t.conv2d(&w, pad, stride, 1, 1).unwrap() * &g)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            for i in 0..base.len() {
                let (mut p, mut m) = (base.clone(), base.clone());
                p[i] += 0.5;
                m[i] -= 0.5;
                let fd = loss(p) - loss(m);
                let case = (b, c, h, wd, o, k, pad, stride);
                assert!(
                    (fd - gv[i]).abs() < 1e-9,
                    "{case:?} x[{i}]: {} vs {fd}",
                    gv[i]
                );
            }
            // And through the frozen op's backward.
            let x = Var::from_tensor(&x0).unwrap();
            let yf = frozen_conv2d(x.as_tensor(), &w, pad, stride).unwrap();
            // The forward (conv2d_gemm's im2col) equals candle's conv2d.
            let e = max_diff(&yf, &y);
            assert!(e < 1e-12, "forward {e}");
            let gs = (yf * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let d = max_diff(gs.get(x.as_tensor()).unwrap(), &got);
            assert!(d < 1e-12);
            assert!(gs.get(&w).is_none());
        }
        // f32 runs the same kernel.
        let g32 = conv2d_input_grad(
            &seq(&[1, 3, 3, 3], 5).to_dtype(DType::F32).unwrap(),
            &seq(&[3, 2, 3, 3], 6).to_dtype(DType::F32).unwrap(),
            (1, 2, 6, 6),
            1,
            2,
        )
        .unwrap();
        assert_eq!(g32.dims(), &[1, 2, 6, 6]);
    }
    /// The bias-folding convolution gives the plain ops' values and input
    /// gradient, and no gradient for the frozen weight or bias.
    #[test]
    fn bias_folding_matches_plain_ops() {
        let x = Var::from_tensor(&seq(&[2, 3, 7, 7], 15)).unwrap();
        let (w, b) = (seq(&[4, 3, 3, 3], 16), seq(&[4], 17));
        let y = frozen_conv2d_bias(x.as_tensor(), &w, Some(&b), 1, 2).unwrap();
        let y_ref = x
            .as_tensor()
            .conv2d(&w, 1, 2, 1, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, 4, 1, 1)).unwrap())
            .unwrap();
        assert!(max_diff(&y, &y_ref) < 1e-12);
        let c = seq(y.dims(), 18);
        let g = (y * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = (y_ref * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = g.get(x.as_tensor()).unwrap();
        assert!(max_diff(gx, g_ref.get(x.as_tensor()).unwrap()) < 1e-12);
        assert!(g.get(&w).is_none() && g.get(&b).is_none());
    }
}
