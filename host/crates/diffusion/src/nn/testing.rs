//! Helpers shared by the unit tests of `nn`.

use candle_core::{Device, Tensor, Var};

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

/// Value and input gradient of `sum(c ⊙ f(x))`.
pub fn value_and_grad(x0: &Tensor, c: &Tensor, f: impl Fn(&Tensor) -> Tensor) -> (Tensor, Tensor) {
    let x = Var::from_tensor(x0).unwrap();
    let y = f(x.as_tensor());
    let g = (&y * c).unwrap().sum_all().unwrap().backward().unwrap();
    (y, g.get(x.as_tensor()).unwrap().clone())
}
