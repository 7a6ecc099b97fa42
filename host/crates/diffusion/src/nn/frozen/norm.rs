//! Group and layer norm with a frozen affine as one fused node whose
//! backward returns only the input's gradient (kernels in `crate::nn::fused`).

use anyhow::Result;
use candle_core::{DType, Tensor, D};

use crate::nn::fused::{fused_ok, AffineNorm};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::activation::silu;
    use crate::nn::testing::{max_diff, seq, value_and_grad};
    use candle_core::Var;

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
