//! Linear layers with a frozen weight (and bias): the product computed
//! off-graph, only the input's gradient in the backward.

use anyhow::Result;
use candle_core::Tensor;

use super::{wanted, FrozenProduct, Kind};

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

/// `x [n, in] · wᵀ + b` with a frozen `w` `[out, in]` and bias `b` `[out]`:
/// the bias is added off-graph too, so the backward neither computes nor
/// stores a gradient for it (candle's `broadcast_add` of a constant still
/// materialises an `[n, out]` gradient for the broadcast bias). Falls back to
/// [`frozen_matmul_t`] + `broadcast_add` when `b` tracks gradients.
pub fn frozen_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let b_frozen = b.is_none_or(|b| !b.track_op());
    if !wanted(x, w) || !b_frozen {
        let y = frozen_matmul_t(x, w)?;
        return Ok(match b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        });
    }
    let mut y = x.detach().matmul(&w.t()?)?;
    if let Some(b) = b {
        y = y.broadcast_add(b)?;
    }
    let op = FrozenProduct {
        weight: w.clone(),
        kind: Kind::Linear,
    };
    Ok(x.apply_op2(&y.contiguous()?, op)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::testing::{max_diff, seq};
    use candle_core::Var;

    /// The bias-folding linear layer gives the plain ops' values and input
    /// gradient, and no gradient for the frozen weight or bias.
    #[test]
    fn bias_folding_matches_plain_ops() {
        let x = Var::from_tensor(&seq(&[5, 4], 11)).unwrap();
        let (w, b) = (seq(&[3, 4], 12), seq(&[3], 13));
        let c = seq(&[5, 3], 14);
        let y = frozen_linear(x.as_tensor(), &w, Some(&b)).unwrap();
        let y_ref = x
            .as_tensor()
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        assert!(max_diff(&y, &y_ref) < 1e-14);
        let g = (y * &c).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(g.get(x.as_tensor()).unwrap(), &c.matmul(&w).unwrap()) < 1e-14);
        assert!(g.get(&w).is_none() && g.get(&b).is_none());
    }
}
