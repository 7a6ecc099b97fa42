//! 2-D convolution as one GEMM over an im2col matrix, written with plain
//! (differentiable) tensor ops. It reads the weight in its stored
//! `[out, in, kh, kw]` layout as an `[out, in*kh*kw]` matrix, so no weight
//! bytes are copied per call: candle's CPU conv2d re-lays out the whole kernel
//! on every call (a 59 MB single-threaded strided copy for a 1280x1280 3x3
//! conv), which dominates the UNet at small latents (benches/unet_step.rs).
//! This is the crate's one im2col: `Conv2d::forward` and the frozen
//! convolution's off-graph forward (`frozen::conv`) both go through it.

use anyhow::{ensure, Result};
use candle_core::Tensor;

/// `conv2d(x, w)` with symmetric zero `padding`, `stride`, dilation 1, groups 1:
/// `x` `[B, C, H, W]`, `w` `[O, C, kh, kw]` -> `[B, O, H', W']` (a transposed
/// view; callers typically add a bias next, which makes it contiguous).
pub fn conv2d_gemm(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let (o, cw, kh, kw) = w.dims4()?;
    ensure!(
        c == cw,
        "conv2d: input has {c} channels, weight {:?}",
        w.dims()
    );
    ensure!(stride >= 1, "conv2d: stride must be >= 1");
    let (hp, wp) = (h + 2 * padding, wd + 2 * padding);
    ensure!(
        hp >= kh && wp >= kw,
        "conv2d: kernel {kh}x{kw} larger than padded input {hp}x{wp}"
    );
    let (oh, ow) = ((hp - kh) / stride + 1, (wp - kw) / stride + 1);
    let k = c * kh * kw;
    let wm = w.reshape((o, k))?;

    if kh == 1 && kw == 1 && padding == 0 && stride == 1 {
        // Pointwise: [O, C] @ [C, B*H*W] with the batch moved next to the pixels.
        let xc = x.transpose(0, 1)?.reshape((c, b * h * wd))?;
        let y = wm.matmul(&xc)?.reshape((o, b, h, wd))?;
        return Ok(y.transpose(0, 1)?);
    }

    // [C, B, H, W], zero-padded (and rounded up to a multiple of the stride).
    let xt = x.transpose(0, 1)?.contiguous()?;
    let (hr, wr) = (hp.div_ceil(stride) * stride, wp.div_ceil(stride) * stride);
    let xt = if padding > 0 || hr > hp || wr > wp {
        xt.pad_with_zeros(2, padding, padding + hr - hp)?
            .pad_with_zeros(3, padding, padding + wr - wp)?
    } else {
        xt
    };
    let xr = xt.reshape((c, b, hr / stride, stride, wr / stride, stride))?;
    // One [C, 1, B*oh*ow] slab per kernel tap, in the weight's (c, i, j) order.
    let mut taps = Vec::with_capacity(kh * kw);
    for i in 0..kh {
        for j in 0..kw {
            let v = xr
                .narrow(2, i / stride, oh)?
                .narrow(3, i % stride, 1)?
                .narrow(4, j / stride, ow)?
                .narrow(5, j % stride, 1)?
                .reshape((c, 1, b * oh * ow))?;
            taps.push(v);
        }
    }
    let col = Tensor::cat(&taps, 1)?.reshape((k, b * oh * ow))?;
    let y = wm.matmul(&col)?.reshape((o, b, oh, ow))?;
    Ok(y.transpose(0, 1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn seq(shape: &[usize], seed: u32) -> Tensor {
        crate::nn::testing::seq(shape, seed)
            .to_dtype(candle_core::DType::F32)
            .unwrap()
    }

    #[test]
    fn matches_candle_conv2d() {
        for &(b, c, h, w, o, k, pad, stride) in &[
            (2, 3, 7, 6, 5, 3, 1, 1),
            (2, 4, 8, 8, 6, 3, 1, 2),
            (1, 4, 9, 7, 3, 3, 1, 2),
            (2, 5, 4, 4, 7, 1, 0, 1),
            (1, 2, 6, 6, 3, 3, 0, 1),
            (2, 3, 5, 5, 2, 3, 0, 2),
        ] {
            let x = seq(&[b, c, h, w], 1);
            let wt = seq(&[o, c, k, k], 2);
            let want = x.conv2d(&wt, pad, stride, 1, 1).unwrap();
            let got = conv2d_gemm(&x, &wt, pad, stride).unwrap();
            assert_eq!(got.dims(), want.dims());
            let d = (got - &want).unwrap().abs().unwrap().max_all().unwrap();
            assert!(
                d.to_scalar::<f32>().unwrap() < 1e-4,
                "{:?}: {d}",
                (b, c, h, w, o, k, pad, stride)
            );
        }
    }

    #[test]
    fn has_gradients_for_input_and_weight() {
        let x = Var::from_tensor(&seq(&[1, 2, 5, 5], 3)).unwrap();
        let w = Var::from_tensor(&seq(&[3, 2, 3, 3], 4)).unwrap();
        let y = conv2d_gemm(x.as_tensor(), w.as_tensor(), 1, 1).unwrap();
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        // Compare with candle's conv2d backward.
        let y2 = x.as_tensor().conv2d(w.as_tensor(), 1, 1, 1, 1).unwrap();
        let g2 = y2.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w] {
            let a = g.get(v.as_tensor()).unwrap();
            let b = g2.get(v.as_tensor()).unwrap();
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-3, "{d}");
        }
    }
}
