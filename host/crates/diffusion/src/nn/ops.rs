//! Differentiable activations, softmax and scaled dot-product attention.
//! On the CPU, in f32/f64, the softmax and the GEGLU gate run as fused
//! kernels with a hand-written backward (one node in candle's graph instead
//! of a dozen element-wise ones); elsewhere they are composed of candle ops.

use anyhow::Result;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor, WithDType, D};

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

/// Fixes candle's CPU thread counts for this process and returns the gemm
/// thread count. Call it first thing in `main`, before any tensor work and
/// before other threads exist (it sets environment variables).
///
/// Without `RAYON_NUM_THREADS`, candle 0.11 asks `num_cpus::get_physical()`
/// on every CPU matmul on machines with uniform cores, which re-reads and
/// parses `/proc/cpuinfo` each time (~15% of a LoRA training step here).
/// `elementwise` sets `CANDLE_NUM_THREADS`, the size of candle's spinning
/// barrier pool for element-wise ops (1 = run them on the calling thread).
/// Variables the user already set are kept.
pub fn configure_cpu_threads(gemm: Option<usize>, elementwise: Option<usize>) -> usize {
    let env_threads = |name: &str| {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|&n| n > 0)
    };
    let n = env_threads("RAYON_NUM_THREADS").unwrap_or_else(|| {
        let n = gemm.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        n
    });
    if env_threads("CANDLE_NUM_THREADS").is_none() {
        if let Some(e) = elementwise {
            std::env::set_var("CANDLE_NUM_THREADS", e.max(1).to_string());
        }
    }
    n
}

/// Whether the fused CPU kernels apply to `x` (CPU, f32 or f64).
fn fused_ok(x: &Tensor) -> bool {
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
struct ScaledSoftmax {
    scale: f64,
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

struct GegluErf;

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
struct AffineNorm {
    /// Elements normalised together.
    n: usize,
    /// Consecutive elements sharing one affine channel (H*W for group norm, 1 for layer norm).
    span: usize,
    /// Channels per row (`n / span`) for group norm; `n` for layer norm.
    channels: usize,
    /// Affine weight/bias indexed by the global channel.
    weight: Vec<f64>,
    bias: Vec<f64>,
    eps: f64,
    silu: bool,
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

fn to_f64_vec(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

/// Group norm of `[B, C, ...]` with a frozen affine (`weight`, `bias` `[C]`),
/// optionally followed by SiLU, as one fused node with an input-only
/// backward. Returns None when it does not apply (parameters that track
/// gradients, not CPU f32/f64): use the composed ops then.
pub fn group_norm_frozen(
    x: &Tensor,
    num_groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    silu: bool,
) -> Result<Option<Tensor>> {
    if !x.track_op() || weight.track_op() || bias.track_op() || !fused_ok(x) || x.rank() < 3 {
        return Ok(None);
    }
    let dims = x.dims();
    let (b, c) = (dims[0], dims[1]);
    if num_groups == 0 || c % num_groups != 0 || weight.elem_count() != c || bias.elem_count() != c
    {
        return Ok(None);
    }
    let span = x.elem_count() / (b * c);
    let op = AffineNorm {
        n: x.elem_count() / (b * num_groups),
        span,
        channels: c / num_groups,
        weight: to_f64_vec(weight)?,
        bias: to_f64_vec(bias)?,
        eps,
        silu,
    };
    Ok(Some(x.contiguous()?.apply_op1(op)?))
}

/// Layer norm over the last dimension with a frozen affine (`weight`, `bias`
/// `[D]`), as one fused node with an input-only backward. None when it does
/// not apply (see [`group_norm_frozen`]).
pub fn layer_norm_frozen(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Option<Tensor>> {
    if !x.track_op() || weight.track_op() || bias.track_op() || !fused_ok(x) {
        return Ok(None);
    }
    let d = x.dim(D::Minus1)?;
    if weight.elem_count() != d || bias.elem_count() != d {
        return Ok(None);
    }
    let op = AffineNorm {
        n: d,
        span: 1,
        channels: d,
        weight: to_f64_vec(weight)?,
        bias: to_f64_vec(bias)?,
        eps,
        silu: false,
    };
    Ok(Some(x.contiguous()?.apply_op1(op)?))
}

/// Helpers shared by the unit tests of `nn`.
#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{Device, Tensor};

    /// A deterministic f64 tensor with entries spread over [-2, 2).
    pub fn seq(shape: &[usize], seed: u32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f64 / 250.0 - 2.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// max |a - b| (any float dtype).
    pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_dtype(candle_core::DType::F64)
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{max_diff, seq};
    use super::*;
    use candle_core::{Device, Var};

    /// Reference softmax(scale x) from plain candle ops (their own backward).
    fn softmax_ref(x: &Tensor, scale: f64) -> Tensor {
        let x = (x * scale).unwrap();
        let m = x.max_keepdim(D::Minus1).unwrap().detach();
        let e = x.broadcast_sub(&m).unwrap().exp().unwrap();
        let s = e.sum_keepdim(D::Minus1).unwrap();
        e.broadcast_div(&s).unwrap()
    }

    /// Value and input gradient of `sum(c ⊙ f(x))`.
    fn value_and_grad(x0: &Tensor, c: &Tensor, f: impl Fn(&Tensor) -> Tensor) -> (Tensor, Tensor) {
        let x = Var::from_tensor(x0).unwrap();
        let y = f(x.as_tensor());
        let g = (&y * c).unwrap().sum_all().unwrap().backward().unwrap();
        (y, g.get(x.as_tensor()).unwrap().clone())
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

    #[test]
    fn fused_norms_match_the_layers_composed_ops() {
        use crate::nn::{GroupNorm, LayerNorm};
        // Group norm (+SiLU) over [2, 6, 3, 2] with 3 groups.
        let gn = GroupNorm {
            weight: seq(&[6], 21),
            bias: seq(&[6], 22),
            num_groups: 3,
            eps: 1e-5,
        };
        let x = seq(&[2, 6, 3, 2], 23);
        let c = seq(&[2, 6, 3, 2], 24);
        for act in [false, true] {
            let (y, g) = value_and_grad(&x, &c, |x| {
                group_norm_frozen(x, 3, &gn.weight, &gn.bias, gn.eps, act)
                    .unwrap()
                    .expect("fused path applies")
            });
            let (yr, gr) = value_and_grad(&x, &c, |x| {
                let y = gn.forward(x).unwrap();
                if act {
                    silu(&y).unwrap()
                } else {
                    y
                }
            });
            assert!(max_diff(&y, &yr) < 1e-12, "silu {act}");
            assert!(
                max_diff(&g, &gr) < 1e-11,
                "silu {act}: {}",
                max_diff(&g, &gr)
            );
        }
        // Layer norm over the last dimension of [2, 3, 5].
        let ln = LayerNorm {
            weight: seq(&[5], 31),
            bias: Some(seq(&[5], 32)),
            eps: 1e-5,
        };
        let x = seq(&[2, 3, 5], 33);
        let c = seq(&[2, 3, 5], 34);
        let b = ln.bias.clone().unwrap();
        let (y, g) = value_and_grad(&x, &c, |x| {
            layer_norm_frozen(x, &ln.weight, &b, ln.eps)
                .unwrap()
                .expect("fused path applies")
        });
        let (yr, gr) = value_and_grad(&x, &c, |x| ln.forward(x).unwrap());
        assert!(max_diff(&y, &yr) < 1e-12);
        assert!(max_diff(&g, &gr) < 1e-11);
        // Trainable affine parameters or untracked inputs take the composed path.
        let w = Var::from_tensor(&ln.weight).unwrap();
        let xv = Var::from_tensor(&x).unwrap();
        assert!(layer_norm_frozen(xv.as_tensor(), w.as_tensor(), &b, 1e-5)
            .unwrap()
            .is_none());
        assert!(layer_norm_frozen(&x, &ln.weight, &b, 1e-5)
            .unwrap()
            .is_none());
    }
}
