//! The latent codec of a model folder: what `vae/config.json` declares.
//! Either diffusers' `AutoencoderKL` (learned, lossy) or `PixelUnshuffle`
//! (no weights, lossless): encode folds each `factor x factor` pixel block
//! into channels (`[B, C, H, W] -> [B, C*f*f, H/f, W/f]`, PyTorch's
//! `pixel_unshuffle` order), decode is the inverse `pixel_shuffle`. The
//! [`Vae`] enum gives both one API (encode to a posterior, latent scaling,
//! decode), so the sampler and the trainer do not care which one a model uses.

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

use crate::vae::{AutoencoderKL, DiagonalGaussian, VaeConfig};
use crate::weights::Vb;

/// The `_class_name` of the pixel-unshuffle codec in `vae/config.json`.
pub const PIXEL_UNSHUFFLE: &str = "PixelUnshuffle";

/// `vae/config.json` of the pixel-unshuffle codec.
#[derive(Debug, Clone, Deserialize)]
pub struct PixelUnshuffleConfig {
    /// Side of the pixel block folded into channels (2: 32x32x3 -> 16x16x12).
    pub factor: usize,
    /// Image channels.
    #[serde(default = "three")]
    pub in_channels: usize,
    /// Latent channels; must equal `in_channels * factor^2` when given.
    #[serde(default)]
    pub latent_channels: Option<usize>,
    /// Latents are multiplied by this after encoding (1 keeps [-1, 1]).
    #[serde(default = "one_f64")]
    pub scaling_factor: f64,
    /// Subtracted before scaling when present.
    #[serde(default)]
    pub shift_factor: Option<f64>,
}

fn three() -> usize {
    3
}
fn one_f64() -> f64 {
    1.0
}

impl PixelUnshuffleConfig {
    /// Parse and validate the JSON text of a pixel-unshuffle config.
    pub fn from_json(text: &str) -> Result<Self> {
        let c: Self = serde_json::from_str(text)?;
        ensure!(c.factor >= 1, "\"factor\" must be at least 1");
        ensure!(c.in_channels >= 1, "\"in_channels\" must be at least 1");
        ensure!(
            c.scaling_factor.is_finite() && c.scaling_factor != 0.0,
            "\"scaling_factor\" must be a finite non-zero number"
        );
        if let Some(l) = c.latent_channels {
            ensure!(
                l == c.channels(),
                "\"latent_channels\" is {l} but in_channels * factor^2 = {}",
                c.channels()
            );
        }
        Ok(c)
    }

    /// Latent channels: `in_channels * factor^2`.
    pub fn channels(&self) -> usize {
        self.in_channels * self.factor * self.factor
    }
}

/// `[B, C, H*f, W*f] -> [B, C*f*f, H, W]`; output channel `c*f*f + i*f + j`
/// holds the pixel at row offset `i`, column offset `j` of each block.
pub fn pixel_unshuffle(xs: &Tensor, f: usize) -> Result<Tensor> {
    let (b, c, h, w) = xs.dims4()?;
    ensure!(
        h.is_multiple_of(f) && w.is_multiple_of(f),
        "image {w}x{h} is not a multiple of the pixel-unshuffle factor {f}"
    );
    let (h2, w2) = (h / f, w / f);
    Ok(xs
        .reshape(vec![b, c, h2, f, w2, f])?
        .permute(vec![0, 1, 3, 5, 2, 4])?
        .reshape((b, c * f * f, h2, w2))?)
}

/// The inverse of [`pixel_unshuffle`]: `[B, C*f*f, H, W] -> [B, C, H*f, W*f]`.
pub fn pixel_shuffle(zs: &Tensor, f: usize) -> Result<Tensor> {
    let (b, cf, h, w) = zs.dims4()?;
    ensure!(
        cf.is_multiple_of(f * f),
        "{cf} latent channels are not a multiple of factor^2 = {}",
        f * f
    );
    let c = cf / (f * f);
    Ok(zs
        .reshape(vec![b, c, f, f, h, w])?
        .permute(vec![0, 1, 4, 2, 5, 3])?
        .reshape((b, c, h * f, w * f))?)
}

/// The weightless, lossless pixel-unshuffle codec.
#[derive(Debug, Clone)]
pub struct PixelUnshuffle {
    config: PixelUnshuffleConfig,
}

impl PixelUnshuffle {
    /// A codec from its config.
    pub fn new(config: PixelUnshuffleConfig) -> Self {
        Self { config }
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &PixelUnshuffleConfig {
        &self.config
    }

    /// Image in [-1, 1] -> a deterministic posterior (std exactly 0).
    pub fn encode(&self, xs: &Tensor) -> Result<DiagonalGaussian> {
        let (_, c, _, _) = xs.dims4()?;
        ensure!(
            c == self.config.in_channels,
            "the pixel-unshuffle codec takes {} image channels, got {c}",
            self.config.in_channels
        );
        let z = pixel_unshuffle(&xs.to_dtype(DType::F32)?, self.config.factor)?;
        DiagonalGaussian::deterministic(z)
    }

    /// Raw latents -> image.
    pub fn decode(&self, zs: &Tensor) -> Result<Tensor> {
        let (_, c, _, _) = zs.dims4()?;
        ensure!(
            c == self.config.channels(),
            "the pixel-unshuffle codec decodes {} latent channels, got {c}",
            self.config.channels()
        );
        pixel_shuffle(&zs.to_dtype(DType::F32)?, self.config.factor)
    }
}

/// A model's latent codec (the `vae/` folder), whichever kind it is.
#[derive(Debug)]
pub enum Vae {
    /// diffusers' `AutoencoderKL` (boxed: it is much larger than the other).
    Kl(Box<AutoencoderKL>),
    /// The weightless pixel-unshuffle fold.
    PixelUnshuffle(PixelUnshuffle),
}

/// The codec class a `vae/config.json` value declares (`AutoencoderKL` when absent).
pub fn codec_class(config: &Value) -> String {
    config
        .get("_class_name")
        .and_then(|c| c.as_str())
        .unwrap_or("AutoencoderKL")
        .to_string()
}

impl Vae {
    /// Loads the codec of the folder `dir` (`config.json` [+ weights]):
    /// `AutoencoderKL` weights in `dtype` (f32 when the model is f16 and the
    /// config asks `force_upcast`); the pixel-unshuffle codec works in f32.
    pub fn load_dir(dir: &Path, dtype: DType, device: &candle_core::Device) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading VAE config {}", path.display()))?;
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("parsing VAE config {}", path.display()))?;
        match codec_class(&value).as_str() {
            PIXEL_UNSHUFFLE => {
                let cfg = PixelUnshuffleConfig::from_json(&text)
                    .with_context(|| format!("in codec config {}", path.display()))?;
                Ok(Self::PixelUnshuffle(PixelUnshuffle::new(cfg)))
            }
            "AutoencoderKL" => {
                let cfg = VaeConfig::from_json(&text)
                    .with_context(|| format!("in VAE config {}", path.display()))?;
                let vae_dtype = if dtype == DType::F16 && cfg.force_upcast {
                    DType::F32
                } else {
                    dtype
                };
                let vb = Vb::from_dir(dir, vae_dtype, device)?;
                let vae = AutoencoderKL::load(&vb, &cfg)
                    .with_context(|| format!("building the VAE from {}", dir.display()))?;
                vb.check_fully_used()
                    .with_context(|| format!("loading {}", dir.display()))?;
                Ok(Self::Kl(Box::new(vae)))
            }
            other => bail!(
                "{}: \"_class_name\" {other:?} is not a codec selma knows (AutoencoderKL or {PIXEL_UNSHUFFLE})",
                path.display()
            ),
        }
    }

    /// The class name (`AutoencoderKL` or `PixelUnshuffle`).
    pub fn class_name(&self) -> &'static str {
        match self {
            Self::Kl(_) => "AutoencoderKL",
            Self::PixelUnshuffle(_) => PIXEL_UNSHUFFLE,
        }
    }

    /// The `AutoencoderKL`, if this is one.
    pub fn as_kl(&self) -> Option<&AutoencoderKL> {
        match self {
            Self::Kl(v) => Some(v),
            Self::PixelUnshuffle(_) => None,
        }
    }

    /// Spatial factor between pixels and latents (8 for SD, 2 for ShapeWorld).
    pub fn downscale(&self) -> usize {
        match self {
            Self::Kl(v) => v.config().downscale(),
            Self::PixelUnshuffle(p) => p.config.factor,
        }
    }

    /// Latent channels.
    pub fn latent_channels(&self) -> usize {
        match self {
            Self::Kl(v) => v.config().latent_channels,
            Self::PixelUnshuffle(p) => p.config.channels(),
        }
    }

    /// The dtype the codec computes in (inputs are converted to it).
    pub fn dtype(&self) -> DType {
        match self {
            Self::Kl(v) => v.dtype(),
            Self::PixelUnshuffle(_) => DType::F32,
        }
    }

    fn scaling(&self) -> (f64, Option<f64>) {
        match self {
            Self::Kl(v) => (v.config().scaling_factor, v.config().shift_factor),
            Self::PixelUnshuffle(p) => (p.config.scaling_factor, p.config.shift_factor),
        }
    }

    /// Image in [-1, 1] -> posterior over the raw (unscaled) latents.
    pub fn encode(&self, xs: &Tensor) -> Result<DiagonalGaussian> {
        match self {
            Self::Kl(v) => v.encode(xs),
            Self::PixelUnshuffle(p) => p.encode(xs),
        }
    }

    /// Raw (unscaled) latents -> image in about [-1, 1].
    pub fn decode(&self, zs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Kl(v) => v.decode(zs),
            Self::PixelUnshuffle(p) => p.decode(zs),
        }
    }

    /// Raw latents -> diffusion-space latents: `(z - shift) * scaling`.
    pub fn scale_latents(&self, z: &Tensor) -> Result<Tensor> {
        let (scale, shift) = self.scaling();
        let z = match shift {
            Some(s) => (z - s)?,
            None => z.clone(),
        };
        Ok((z * scale)?)
    }

    /// Diffusion-space latents -> image: `decode(latents / scaling + shift)`.
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let (scale, shift) = self.scaling();
        let z = (latents * (1.0 / scale))?;
        let z = match shift {
            Some(s) => (z + s)?,
            None => z,
        };
        self.decode(&z)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn unshuffle_matches_hand_computed_layout() {
        // One channel, 4x4 image with values 0..16 row-major, factor 2.
        let x = Tensor::arange(0f32, 16f32, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 4, 4))
            .unwrap();
        let z = pixel_unshuffle(&x, 2).unwrap();
        assert_eq!(z.dims(), &[1, 4, 2, 2]);
        let v = z.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // channel (i, j) holds pixel (2r + i, 2c + j) at (r, c).
        let want = [
            0., 2., 8., 10., // i=0, j=0
            1., 3., 9., 11., // i=0, j=1
            4., 6., 12., 14., // i=1, j=0
            5., 7., 13., 15., // i=1, j=1
        ];
        assert_eq!(v, want);
        let back = pixel_shuffle(&z, 2).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            (0..16).map(|i| i as f32).collect::<Vec<_>>()
        );
    }

    #[test]
    fn config_rejects_inconsistent_channels() {
        let bad = r#"{"_class_name":"PixelUnshuffle","factor":2,"latent_channels":4}"#;
        let e = PixelUnshuffleConfig::from_json(bad).unwrap_err();
        assert!(e.to_string().contains("latent_channels"), "{e}");
        let ok = PixelUnshuffleConfig::from_json(r#"{"factor":2}"#).unwrap();
        assert_eq!(ok.channels(), 12);
        assert_eq!(ok.scaling_factor, 1.0);
    }
}
