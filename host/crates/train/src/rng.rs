//! A seeded, serialisable random source for training (xoshiro256++ seeded
//! through SplitMix64, Box-Muller normals in f64): the whole state is plain
//! data, so a checkpoint can store it and a resumed run draws the same numbers.

use anyhow::Result;
use candle_core::{DType, Device, Shape, Tensor};
use selma_diffusion::scheduler::noise::{xoshiro_next, xoshiro_seed};
use serde::{Deserialize, Serialize};

/// The training RNG; `Clone` + serde so checkpoints capture it exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainRng {
    /// xoshiro256++ state.
    pub s: [u64; 4],
    /// The second Box-Muller value, kept for the next `normal` call.
    pub spare: Option<f64>,
}

impl TrainRng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            s: xoshiro_seed(seed),
            spare: None,
        }
    }

    /// The next raw 64-bit output.
    pub fn next_u64(&mut self) -> u64 {
        xoshiro_next(&mut self.s)
    }

    /// Uniform in the open interval (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in `[0, n)` (`n > 0`), without modulo bias.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }

    /// A fair coin.
    pub fn coin(&mut self) -> bool {
        self.next_u64() >> 63 == 1
    }

    /// One standard-normal draw.
    pub fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let u1 = self.uniform();
        let u2 = self.uniform();
        let r = (-2.0 * u1.ln()).sqrt();
        let th = std::f64::consts::TAU * u2;
        self.spare = Some(r * th.sin());
        r * th.cos()
    }

    /// A Fisher-Yates permutation of `0..n`.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
        v
    }

    /// A tensor of standard-normal values times `std` (drawn in f64 on the
    /// CPU, then converted), so the values do not depend on device or dtype.
    pub fn randn<S: Into<Shape>>(
        &mut self,
        shape: S,
        std: f64,
        device: &Device,
        dtype: DType,
    ) -> Result<Tensor> {
        let shape: Shape = shape.into();
        let v: Vec<f64> = (0..shape.elem_count())
            .map(|_| self.normal() * std)
            .collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_through_json_and_continues_the_stream() {
        let mut a = TrainRng::new(7);
        for _ in 0..5 {
            a.normal();
        }
        let json = serde_json::to_string(&a).unwrap();
        let mut b: TrainRng = serde_json::from_str(&json).unwrap();
        for _ in 0..100 {
            assert_eq!(a.normal().to_bits(), b.normal().to_bits());
            assert_eq!(a.next_u64(), b.next_u64());
        }
    }

    #[test]
    fn permutation_is_a_permutation_and_normals_have_unit_variance() {
        let mut r = TrainRng::new(1);
        let mut p = r.permutation(100);
        assert_ne!(p, (0..100).collect::<Vec<_>>());
        p.sort();
        assert_eq!(p, (0..100).collect::<Vec<_>>());
        let n = 20000;
        let xs: Vec<f64> = (0..n).map(|_| r.normal()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "var {var}");
    }
}
