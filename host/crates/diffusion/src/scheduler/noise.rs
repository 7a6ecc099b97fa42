//! Seeded Gaussian noise that is the same on every machine and device:
//! xoshiro256++ seeded through SplitMix64, Box-Muller in f64, generated on
//! the CPU and then moved to the target device and dtype.

use anyhow::Result;
use candle_core::{DType, Device, Shape, Tensor};

/// A portable, seeded standard-normal generator.
#[derive(Debug, Clone)]
pub struct GaussianRng {
    s: [u64; 4],
    spare: Option<f64>,
}

/// The xoshiro256++ state for `seed`, expanded through SplitMix64 (shared by
/// every seeded stream in selma so that equal seeds mean equal numbers).
pub fn xoshiro_seed(seed: u64) -> [u64; 4] {
    let mut st = seed;
    [
        splitmix64(&mut st),
        splitmix64(&mut st),
        splitmix64(&mut st),
        splitmix64(&mut st),
    ]
}

/// Advance a xoshiro256++ state and return its next 64-bit output.
pub fn xoshiro_next(s: &mut [u64; 4]) -> u64 {
    let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
    let t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = s[3].rotate_left(45);
    result
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl GaussianRng {
    /// A generator for `seed` (any u64; equal seeds give equal streams).
    pub fn new(seed: u64) -> Self {
        Self {
            s: xoshiro_seed(seed),
            spare: None,
        }
    }

    /// The next raw 64-bit output (xoshiro256++).
    pub fn next_u64(&mut self) -> u64 {
        xoshiro_next(&mut self.s)
    }

    /// A uniform draw in the open interval (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
    }

    /// One standard-normal draw (Box-Muller, pairs cached).
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

    /// `n` standard-normal values as f32.
    pub fn normal_vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal() as f32).collect()
    }

    /// A standard-normal tensor of `shape` on `device` in `dtype`.
    pub fn randn<S: Into<Shape>>(
        &mut self,
        shape: S,
        device: &Device,
        dtype: DType,
    ) -> Result<Tensor> {
        let shape: Shape = shape.into();
        let v = self.normal_vec(shape.elem_count());
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?)
    }
}

/// Where ancestral / stochastic schedulers take their fresh noise from.
pub trait NoiseSource {
    /// Standard-normal noise with the shape, device and dtype of `like`.
    fn noise_like(&mut self, like: &Tensor) -> Result<Tensor>;
}

/// One generator per batch element, so that image `i` of a batch seeded `s`
/// equals a single image seeded `s + i`.
#[derive(Debug, Clone)]
pub struct BatchNoise {
    /// The per-element generators.
    pub rngs: Vec<GaussianRng>,
}

impl BatchNoise {
    /// Generators seeded `seed, seed + 1, ...` for a batch of `n`.
    pub fn from_seed(seed: u64, n: usize) -> Self {
        Self {
            rngs: (0..n as u64)
                .map(|i| GaussianRng::new(seed.wrapping_add(i)))
                .collect(),
        }
    }
}

impl NoiseSource for BatchNoise {
    fn noise_like(&mut self, like: &Tensor) -> Result<Tensor> {
        let dims = like.dims();
        let b = dims[0];
        anyhow::ensure!(
            b == self.rngs.len(),
            "noise for a batch of {b} from {} generators",
            self.rngs.len()
        );
        let mut one = dims.to_vec();
        one[0] = 1;
        let parts = self
            .rngs
            .iter_mut()
            .map(|r| r.randn(one.clone(), like.device(), like.dtype()))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }
}
