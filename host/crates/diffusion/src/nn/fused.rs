//! Fused CPU kernels (f32/f64) with hand-written backwards: one node in
//! candle's graph instead of a dozen element-wise ones. `ScaledSoftmax`
//! (softmax of a scaled input), `GegluErf` (diffusers' GEGLU gate) and
//! `AffineNorm` (group/layer norm with a frozen affine, optionally followed
//! by SiLU; input-only backward). Their public entry points are
//! `softmax_last_dim`, `attention`, `geglu_erf` and the frozen norms.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor, WithDType};

/// Whether the fused CPU kernels apply to `x` (CPU, f32 or f64).
pub(crate) fn fused_ok(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// The float operations the fused kernels need, for f32 and f64.
trait Real: WithDType {
    fn exp_(self) -> Self;
    fn erf_(self) -> Self;
    fn max_(self, o: Self) -> Self;
}

macro_rules! impl_real {
    ($t:ty, $erf:path) => {
        impl Real for $t {
            fn exp_(self) -> Self {
                self.exp()
            }
            fn erf_(self) -> Self {
                $erf(self)
            }
            fn max_(self, o: Self) -> Self {
                self.max(o)
            }
        }
    };
}
impl_real!(f32, candle_core::cpu::erf::erf_f32);
impl_real!(f64, candle_core::cpu::erf::erf_f64);

/// The contiguous slice a layout covers.
fn slice<'a, T>(v: &'a [T], l: &Layout, op: &str) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// Applies `f32`/`f64` kernels to one storage.
macro_rules! unary_real {
    ($s:expr, $l:expr, $op:expr, $f:expr) => {
        match $s {
            CpuStorage::F32(v) => CpuStorage::F32($f(slice(v, $l, $op)?)),
            CpuStorage::F64(v) => CpuStorage::F64($f(slice(v, $l, $op)?)),
            _ => candle_core::bail!("{}: f32/f64 only", $op),
        }
    };
}

/// Applies `f32`/`f64` kernels to two storages of the same dtype.
macro_rules! binary_real {
    ($s1:expr, $l1:expr, $s2:expr, $l2:expr, $op:expr, $f:expr) => {
        match ($s1, $s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                CpuStorage::F32($f(slice(a, $l1, $op)?, slice(b, $l2, $op)?))
            }
            (CpuStorage::F64(a), CpuStorage::F64(b)) => {
                CpuStorage::F64($f(slice(a, $l1, $op)?, slice(b, $l2, $op)?))
            }
            _ => candle_core::bail!("{}: f32/f64 operands of one dtype only", $op),
        }
    };
}

/// `softmax(scale · x)` over the last dimension, with its backward
/// `dx = scale · y ⊙ (g - Σ g ⊙ y)`.
pub(crate) struct ScaledSoftmax {
    /// Factor applied to the input before the softmax.
    pub(crate) scale: f64,
}

fn softmax_rows<T: Real>(x: &[T], n: usize, scale: f64) -> Vec<T> {
    let scale = T::from_f64(scale);
    let mut y = vec![T::zero(); x.len()];
    for (xr, yr) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
        let m = xr.iter().fold(xr[0], |m, &v| m.max_(v));
        let mut sum = T::zero();
        for (yv, &xv) in yr.iter_mut().zip(xr) {
            *yv = ((xv - m) * scale).exp_();
            sum += *yv;
        }
        let inv = T::one() / sum;
        for yv in yr.iter_mut() {
            *yv *= inv;
        }
    }
    y
}

impl CustomOp1 for ScaledSoftmax {
    fn name(&self) -> &'static str {
        "scaled-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = l.shape().dims().last().copied().unwrap_or(1).max(1);
        let out = unary_real!(s, l, "scaled-softmax", |x| softmax_rows(x, n, self.scale));
        Ok((out, l.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        Ok(Some(g.apply_op2_no_bwd(
            res,
            &ScaledSoftmaxGrad { scale: self.scale },
        )?))
    }
}

/// Backward of [`ScaledSoftmax`]: `(g, y) -> scale · y ⊙ (g - Σ g ⊙ y)`.
struct ScaledSoftmaxGrad {
    scale: f64,
}

fn softmax_grad_rows<T: Real>(g: &[T], y: &[T], n: usize, scale: f64) -> Vec<T> {
    let scale = T::from_f64(scale);
    let mut dx = vec![T::zero(); g.len()];
    for ((gr, yr), dr) in g
        .chunks_exact(n)
        .zip(y.chunks_exact(n))
        .zip(dx.chunks_exact_mut(n))
    {
        let mut dot = T::zero();
        for (&gv, &yv) in gr.iter().zip(yr) {
            dot += gv * yv;
        }
        for ((d, &gv), &yv) in dr.iter_mut().zip(gr).zip(yr) {
            *d = scale * yv * (gv - dot);
        }
    }
    dx
}

impl CustomOp2 for ScaledSoftmaxGrad {
    fn name(&self) -> &'static str {
        "scaled-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = l1.shape().dims().last().copied().unwrap_or(1).max(1);
        let out = binary_real!(s1, l1, s2, l2, "scaled-softmax-grad", |g, y| {
            softmax_grad_rows(g, y, n, self.scale)
        });
        Ok((out, l1.shape().clone()))
    }
}

/// The fused GEGLU gate (see `geglu_erf`).
pub(crate) struct GegluErf;

const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

fn geglu_rows<T: Real>(h: &[T], n2: usize) -> Vec<T> {
    let n = n2 / 2;
    let (half, r2) = (
        T::from_f64(0.5),
        T::from_f64(std::f64::consts::FRAC_1_SQRT_2),
    );
    let mut out = vec![T::zero(); h.len() / 2];
    for (hr, or) in h.chunks_exact(n2).zip(out.chunks_exact_mut(n)) {
        let (a, b) = hr.split_at(n);
        for ((o, &av), &bv) in or.iter_mut().zip(a).zip(b) {
            *o = av * bv * half * (T::one() + (bv * r2).erf_());
        }
    }
    out
}

fn geglu_grad_rows<T: Real>(g: &[T], h: &[T], n2: usize) -> Vec<T> {
    let n = n2 / 2;
    let (half, r2) = (
        T::from_f64(0.5),
        T::from_f64(std::f64::consts::FRAC_1_SQRT_2),
    );
    let c = T::from_f64(FRAC_1_SQRT_2PI);
    let mut dh = vec![T::zero(); h.len()];
    for ((gr, hr), dr) in g
        .chunks_exact(n)
        .zip(h.chunks_exact(n2))
        .zip(dh.chunks_exact_mut(n2))
    {
        let (a, b) = hr.split_at(n);
        let (da, db) = dr.split_at_mut(n);
        for i in 0..n {
            let (av, bv, gv) = (a[i], b[i], gr[i]);
            let cdf = half * (T::one() + (bv * r2).erf_());
            let pdf = c * (T::zero() - half * bv * bv).exp_();
            da[i] = gv * bv * cdf;
            db[i] = gv * av * (cdf + bv * pdf);
        }
    }
    dh
}

impl CustomOp1 for GegluErf {
    fn name(&self) -> &'static str {
        "geglu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let mut dims = l.shape().dims().to_vec();
        let n2 = dims.last().copied().unwrap_or(0);
        let out = unary_real!(s, l, "geglu-erf", |h| geglu_rows(h, n2));
        if let Some(d) = dims.last_mut() {
            *d /= 2;
        }
        Ok((out, Shape::from(dims)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        Ok(Some(g.apply_op2_no_bwd(arg, &GegluErfGrad)?))
    }
}

/// Backward of [`GegluErf`]: `(g, h) -> dh`.
struct GegluErfGrad;

impl CustomOp2 for GegluErfGrad {
    fn name(&self) -> &'static str {
        "geglu-erf-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n2 = l2.shape().dims().last().copied().unwrap_or(0);
        let out = binary_real!(s1, l1, s2, l2, "geglu-erf-grad", |g, h| geglu_grad_rows(
            g, h, n2
        ));
        Ok((out, l2.shape().clone()))
    }
}

/// Normalisation `y = (x - mean) / sqrt(var + eps) · w[c] + b[c]` of
/// contiguous rows of `n` elements (group norm: a row is one group of one
/// sample, `span` = H*W elements per channel; layer norm: a row is one token,
/// `span` = 1), optionally followed by SiLU. Statistics in f64.
#[derive(Debug, Clone)]
pub(crate) struct AffineNorm {
    /// Elements normalised together.
    pub(crate) n: usize,
    /// Consecutive elements sharing one affine channel (H*W for group norm, 1 for layer norm).
    pub(crate) span: usize,
    /// Channels per row (`n / span`) for group norm; `n` for layer norm.
    pub(crate) channels: usize,
    /// Affine weight indexed by the global channel.
    pub(crate) weight: Vec<f64>,
    /// Affine bias indexed by the global channel.
    pub(crate) bias: Vec<f64>,
    /// Epsilon added to the variance.
    pub(crate) eps: f64,
    /// Apply SiLU after the affine.
    pub(crate) silu: bool,
}

impl AffineNorm {
    /// Weight and bias of local channel `k` of row `r`.
    #[inline]
    fn affine(&self, r: usize, k: usize) -> (f64, f64) {
        let c = (r * self.channels + k) % self.weight.len();
        (self.weight[c], self.bias[c])
    }

    /// Mean and 1/std of one row (f64 accumulation).
    fn stats<T: Real>(&self, xr: &[T]) -> (f64, f64) {
        let n = xr.len() as f64;
        let (mut s, mut s2) = (0f64, 0f64);
        for &v in xr {
            let v = v.to_f64();
            s += v;
            s2 += v * v;
        }
        let mean = s / n;
        let var = (s2 / n - mean * mean).max(0.0);
        (mean, 1.0 / (var + self.eps).sqrt())
    }

    fn fwd<T: Real>(&self, x: &[T]) -> Vec<T> {
        let mut y = vec![T::zero(); x.len()];
        let one = T::one();
        for (r, (xr, yr)) in x
            .chunks_exact(self.n)
            .zip(y.chunks_exact_mut(self.n))
            .enumerate()
        {
            let (mean, rstd) = self.stats(xr);
            for (k, (xs, ys)) in xr
                .chunks_exact(self.span)
                .zip(yr.chunks_exact_mut(self.span))
                .enumerate()
            {
                let (w, b) = self.affine(r, k);
                let (a, c) = (T::from_f64(rstd * w), T::from_f64(b - mean * rstd * w));
                for (yv, &xv) in ys.iter_mut().zip(xs) {
                    let v = xv * a + c;
                    *yv = if self.silu {
                        v / (one + (T::zero() - v).exp_())
                    } else {
                        v
                    };
                }
            }
        }
        y
    }

    /// `dx` from `dL/dy` and `x` (statistics recomputed).
    fn bwd<T: Real>(&self, g: &[T], x: &[T]) -> Vec<T> {
        let mut dx = vec![T::zero(); x.len()];
        let one = T::one();
        for (r, ((gr, xr), dr)) in g
            .chunks_exact(self.n)
            .zip(x.chunks_exact(self.n))
            .zip(dx.chunks_exact_mut(self.n))
            .enumerate()
        {
            let (mean, rstd) = self.stats(xr);
            let (tm, tr) = (T::from_f64(mean), T::from_f64(rstd));
            // dr <- dL/dxhat; s1 = Σ dxhat, s2 = Σ dxhat·xhat.
            let (mut s1, mut s2) = (0f64, 0f64);
            for (k, ((gs, xs), ds)) in gr
                .chunks_exact(self.span)
                .zip(xr.chunks_exact(self.span))
                .zip(dr.chunks_exact_mut(self.span))
                .enumerate()
            {
                let (w, b) = self.affine(r, k);
                let (tw, tb) = (T::from_f64(w), T::from_f64(b));
                let (mut a1, mut a2) = (T::zero(), T::zero());
                for ((d, &gv), &xv) in ds.iter_mut().zip(gs).zip(xs) {
                    let xhat = (xv - tm) * tr;
                    let gy = if self.silu {
                        let v = xhat * tw + tb;
                        let sg = one / (one + (T::zero() - v).exp_());
                        gv * sg * (one + v * (one - sg))
                    } else {
                        gv
                    };
                    let dh = gy * tw;
                    *d = dh;
                    a1 += dh;
                    a2 += dh * xhat;
                }
                s1 += a1.to_f64();
                s2 += a2.to_f64();
            }
            let n = self.n as f64;
            let (m1, m2) = (T::from_f64(s1 / n), T::from_f64(s2 / n));
            for (d, &xv) in dr.iter_mut().zip(xr) {
                let xhat = (xv - tm) * tr;
                *d = tr * (*d - m1 - xhat * m2);
            }
        }
        dx
    }
}

impl CustomOp1 for AffineNorm {
    fn name(&self) -> &'static str {
        "affine-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = unary_real!(s, l, "affine-norm", |x| self.fwd(x));
        Ok((out, l.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        Ok(Some(
            g.apply_op2_no_bwd(arg, &AffineNormGrad(self.clone()))?,
        ))
    }
}

/// Backward of [`AffineNorm`]: `(g, x) -> dx`.
struct AffineNormGrad(AffineNorm);

impl CustomOp2 for AffineNormGrad {
    fn name(&self) -> &'static str {
        "affine-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = binary_real!(s1, l1, s2, l2, "affine-norm-grad", |g, x| self.0.bwd(g, x));
        Ok((out, l2.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::activation::{geglu_erf, softmax_last_dim};
    use crate::nn::testing::{max_diff, seq, value_and_grad};
    use candle_core::{Device, D};

    /// Reference softmax(scale x) from plain candle ops (their own backward).
    fn softmax_ref(x: &Tensor, scale: f64) -> Tensor {
        let x = (x * scale).unwrap();
        let m = x.max_keepdim(D::Minus1).unwrap().detach();
        let e = x.broadcast_sub(&m).unwrap().exp().unwrap();
        let s = e.sum_keepdim(D::Minus1).unwrap();
        e.broadcast_div(&s).unwrap()
    }

    #[test]
    fn fused_softmax_matches_composed_ops_and_their_gradient() {
        for (shape, scale) in [
            (vec![3, 4, 7], 0.35),
            (vec![2, 5], 1.0),
            (vec![1, 1, 9], 2.5),
        ] {
            let x = seq(&shape, 7);
            let c = seq(&shape, 9);
            let (y, g) = value_and_grad(&x, &c, |x| x.apply_op1(ScaledSoftmax { scale }).unwrap());
            let (yr, gr) = value_and_grad(&x, &c, |x| softmax_ref(x, scale));
            assert!(max_diff(&y, &yr) < 1e-14, "{shape:?}");
            assert!(max_diff(&g, &gr) < 1e-13, "{shape:?}");
            // f32 agrees with f64.
            let y32 = x
                .to_dtype(DType::F32)
                .unwrap()
                .apply_op1(ScaledSoftmax { scale })
                .unwrap();
            assert!(max_diff(&y32.to_dtype(DType::F64).unwrap(), &yr) < 1e-6);
        }
        // The public entry point takes the fused path when tracking.
        let x = seq(&[4, 6], 3);
        let c = seq(&[4, 6], 4);
        let (_, g) = value_and_grad(&x, &c, |x| softmax_last_dim(x).unwrap());
        let (_, gr) = value_and_grad(&x, &c, |x| softmax_ref(x, 1.0));
        assert!(max_diff(&g, &gr) < 1e-13);
    }
    #[test]
    fn fused_geglu_matches_composed_ops_and_finite_differences() {
        let x = seq(&[2, 3, 8], 11);
        let c = seq(&[2, 3, 4], 12);
        let (y, g) = value_and_grad(&x, &c, |x| geglu_erf(x).unwrap());
        let (yr, gr) = value_and_grad(&x, &c, |x| {
            let a = x.narrow(D::Minus1, 0, 4).unwrap();
            let b = x.narrow(D::Minus1, 4, 4).unwrap();
            (a * b.gelu_erf().unwrap()).unwrap()
        });
        assert!(max_diff(&y, &yr) < 1e-14);
        // candle's own gelu_erf backward rounds 1/sqrt(2π) to 0.398942, so
        // compare with it loosely and with central differences tightly.
        assert!(max_diff(&g, &gr) < 1e-5);
        let base = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let gv = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let loss = |v: Vec<f64>| -> f64 {
            let t = Tensor::from_vec(v, (2, 3, 8), &Device::Cpu).unwrap();
            (geglu_erf(&t).unwrap() * &c)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        for i in 0..base.len() {
            let (mut p, mut m) = (base.clone(), base.clone());
            p[i] += 1e-6;
            m[i] -= 1e-6;
            let fd = (loss(p) - loss(m)) / 2e-6;
            assert!((fd - gv[i]).abs() < 1e-7, "h[{i}]: {} vs {fd}", gv[i]);
        }
    }
}
