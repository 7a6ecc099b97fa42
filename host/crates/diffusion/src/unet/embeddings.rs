//! Timestep embeddings of the UNet: diffusers' sinusoidal `get_timestep_embedding`
//! (per-sample timesteps, `flip_sin_to_cos`, `downscale_freq_shift`) and the
//! two-layer `TimestepEmbedding` MLP (`linear_1`, SiLU, `linear_2`), which SDXL
//! reuses as `add_embedding`.

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor, D};

use crate::nn::{join_path, silu, Adaptable, Linear, LoraHost};
use crate::weights::Vb;

/// Sinusoidal embedding of `timesteps` (`[N]`, any float/int dtype) to `[N, dim]` f32,
/// exactly as diffusers' `get_timestep_embedding` with `max_period = 10000`, `scale = 1`.
pub fn timestep_embedding(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
) -> Result<Tensor> {
    ensure!(
        timesteps.rank() == 1,
        "timesteps must be a 1-D tensor, got shape {:?}",
        timesteps.dims()
    );
    let half = dim / 2;
    let denom = half as f64 - downscale_freq_shift;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(10000f64.ln()) * i as f64 / denom).exp() as f32)
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), timesteps.device())?;
    let t = timesteps.to_dtype(DType::F32)?.unsqueeze(1)?;
    let args = t.broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[&cos, &sin], D::Minus1)?
    } else {
        Tensor::cat(&[&sin, &cos], D::Minus1)?
    };
    if dim % 2 == 1 {
        Ok(emb.pad_with_zeros(D::Minus1, 0, 1)?)
    } else {
        Ok(emb)
    }
}

/// diffusers' `TimestepEmbedding` with SiLU: `linear_2(silu(linear_1(x)))`.
#[derive(Debug)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    /// Loads `linear_1` (`in_dim -> dim`) and `linear_2` (`dim -> dim`) under `vb`.
    pub fn load(vb: &Vb, in_dim: usize, dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::load(&vb.pp("linear_1"), in_dim, dim, true)?,
            linear_2: Linear::load(&vb.pp("linear_2"), dim, dim, true)?,
        })
    }

    /// `[N, in_dim]` -> `[N, dim]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = silu(&self.linear_1.forward(x)?)?;
        self.linear_2.forward(&x)
    }
}

impl Adaptable for TimestepEmbedding {
    fn visit_adaptable(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut dyn LoraHost)) {
        self.linear_1
            .visit_adaptable(&join_path(prefix, "linear_1"), f);
        self.linear_2
            .visit_adaptable(&join_path(prefix, "linear_2"), f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn sinusoid_matches_hand_computed_values() {
        // dim 4, shift 0: freqs = [1, exp(-ln(10000)/2)] = [1, 0.01].
        let t = Tensor::new(&[0f32, 10.0], &Device::Cpu).unwrap();
        let e = timestep_embedding(&t, 4, true, 0.0).unwrap();
        let v = e.to_vec2::<f32>().unwrap();
        let want0 = [1.0, 1.0, 0.0, 0.0];
        let want1 = [10f32.cos(), 0.1f32.cos(), 10f32.sin(), 0.1f32.sin()];
        for (a, b) in v[0].iter().zip(want0).chain(v[1].iter().zip(want1)) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        // shift 1 (freq_shift=1): freqs = [1, exp(-ln(10000)/1)] = [1, 1e-4], sin first.
        let e = timestep_embedding(&t, 4, false, 1.0).unwrap();
        let v = e.to_vec2::<f32>().unwrap();
        let want1 = [10f32.sin(), 1e-3f32.sin(), 10f32.cos(), 1e-3f32.cos()];
        for (a, b) in v[1].iter().zip(want1) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }
}
