//! diffusers' `AutoencoderKL` (the Stable Diffusion VAE): encoder, decoder,
//! mid-block attention, `quant_conv` / `post_quant_conv`, the diagonal
//! Gaussian posterior and the latent scaling (`scaling_factor`,
//! `shift_factor`) read from `vae/config.json`. Field names mirror the
//! checkpoint keys (`encoder.down_blocks.0.resnets.0.conv1.weight`, ...);
//! both attention key styles load (`to_q`/`to_out.0` and the legacy
//! `query`/`proj_attn`, linear or 1x1-conv shaped).

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor};
use serde::Deserialize;
use std::path::Path;

use crate::nn::{attention, Conv2d, GroupNorm, Linear};
use crate::scheduler::GaussianRng;
use crate::weights::Vb;

/// `vae/config.json`, with diffusers' defaults for absent fields.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    /// Image channels in.
    #[serde(default = "three")]
    pub in_channels: usize,
    /// Image channels out.
    #[serde(default = "three")]
    pub out_channels: usize,
    /// Must all be `DownEncoderBlock2D`.
    #[serde(default)]
    pub down_block_types: Vec<String>,
    /// Must all be `UpDecoderBlock2D`.
    #[serde(default)]
    pub up_block_types: Vec<String>,
    /// Channels per resolution level.
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block (decoder blocks have one more).
    #[serde(default = "one")]
    pub layers_per_block: usize,
    /// Activation (only `silu` exists in SD VAEs).
    #[serde(default = "silu_name")]
    pub act_fn: String,
    /// Latent channels (4 for SD).
    #[serde(default = "four")]
    pub latent_channels: usize,
    /// GroupNorm groups.
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    /// Training resolution (informational).
    #[serde(default)]
    pub sample_size: Option<usize>,
    /// Latents are multiplied by this after encoding (0.18215 SD, 0.13025 SDXL).
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    /// Subtracted before scaling when present.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Run the VAE in f32 when the model is f16 (SDXL's VAE overflows in f16).
    #[serde(default = "yes")]
    pub force_upcast: bool,
    /// Whether `quant_conv` exists.
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    /// Whether `post_quant_conv` exists.
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    /// Whether the mid blocks have their attention.
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
}

fn three() -> usize {
    3
}
fn one() -> usize {
    1
}
fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn silu_name() -> String {
    "silu".into()
}
fn default_scaling() -> f64 {
    0.18215
}
fn yes() -> bool {
    true
}

impl VaeConfig {
    /// Read and validate `vae/config.json` (errors name the file and key).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading VAE config {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("in VAE config {}", path.display()))
    }

    /// Parse and validate the JSON text of a VAE config.
    pub fn from_json(text: &str) -> Result<Self> {
        let c: Self = serde_json::from_str(text)?;
        ensure!(
            !c.block_out_channels.is_empty(),
            "\"block_out_channels\" is empty"
        );
        let n = c.block_out_channels.len();
        for (key, types, want) in [
            (
                "down_block_types",
                &c.down_block_types,
                "DownEncoderBlock2D",
            ),
            ("up_block_types", &c.up_block_types, "UpDecoderBlock2D"),
        ] {
            if types.is_empty() {
                continue;
            }
            ensure!(
                types.len() == n,
                "\"{key}\" has {} entries but \"block_out_channels\" has {n}",
                types.len()
            );
            if let Some(t) = types.iter().find(|t| t.as_str() != want) {
                bail!("\"{key}\" contains {t:?}; only {want} is supported");
            }
        }
        ensure!(
            c.act_fn == "silu",
            "\"act_fn\" {:?} is not supported (only silu)",
            c.act_fn
        );
        for &ch in &c.block_out_channels {
            ensure!(
                ch.is_multiple_of(c.norm_num_groups),
                "\"block_out_channels\" entry {ch} is not divisible by norm_num_groups {}",
                c.norm_num_groups
            );
        }
        Ok(c)
    }

    /// Spatial downscale factor between image and latents (8 for SD).
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

const EPS: f64 = 1e-6;

/// A VAE resnet (`ResnetBlock2D` without time embedding).
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    /// Loads a resnet `cin -> cout`.
    pub fn load(vb: &Vb, cin: usize, cout: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::load(&vb.pp("norm1"), groups, cin, EPS)?,
            conv1: Conv2d::load(&vb.pp("conv1"), cin, cout, 3, 1, 1, true)?,
            norm2: GroupNorm::load(&vb.pp("norm2"), groups, cout, EPS)?,
            conv2: Conv2d::load(&vb.pp("conv2"), cout, cout, 3, 1, 1, true)?,
            conv_shortcut: if cin != cout {
                Some(Conv2d::load(
                    &vb.pp("conv_shortcut"),
                    cin,
                    cout,
                    1,
                    1,
                    0,
                    true,
                )?)
            } else {
                None
            },
        })
    }

    /// `[B, cin, H, W] -> [B, cout, H, W]`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(xs)?)?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(xs)?,
            None => xs.clone(),
        };
        Ok((skip + h)?)
    }
}

fn load_proj(vb: &Vb, names: &[&str], ch: usize) -> Result<Linear> {
    let name = names
        .iter()
        .find(|n| vb.contains(&format!("{n}.weight")))
        .copied()
        .unwrap_or(names[0]);
    let v = vb.pp(name);
    match v.shape_of("weight").as_deref() {
        Some([_, _, 1, 1]) => {
            let w = v.get((ch, ch, 1, 1), "weight")?.reshape((ch, ch))?;
            Ok(Linear::new(w, Some(v.get(ch, "bias")?)))
        }
        _ => Linear::load(&v, ch, ch, true),
    }
}

/// The single-head self-attention of the VAE mid blocks (`attentions.0`).
#[derive(Debug)]
pub struct AttentionBlock {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    channels: usize,
}

impl AttentionBlock {
    /// Loads `group_norm`, `to_q`, `to_k`, `to_v`, `to_out.0` (or the legacy names).
    pub fn load(vb: &Vb, channels: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            group_norm: GroupNorm::load(&vb.pp("group_norm"), groups, channels, EPS)?,
            to_q: load_proj(vb, &["to_q", "query"], channels)?,
            to_k: load_proj(vb, &["to_k", "key"], channels)?,
            to_v: load_proj(vb, &["to_v", "value"], channels)?,
            to_out: load_proj(vb, &["to_out.0", "proj_attn"], channels)?,
            channels,
        })
    }

    /// Residual self-attention over the `H * W` positions.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let x = self
            .group_norm
            .forward(xs)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.to_q.forward(&x)?;
        let k = self.to_k.forward(&x)?;
        let v = self.to_v.forward(&x)?;
        let scale = 1.0 / (self.channels as f64).sqrt();
        let a = attention(&q, &k, &v, None, scale)?;
        let out = self
            .to_out
            .forward(&a)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        Ok((out + xs)?)
    }
}

/// `mid_block`: resnet, attention, resnet.
#[derive(Debug)]
pub struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<AttentionBlock>,
}

impl MidBlock {
    fn load(vb: &Vb, ch: usize, groups: usize, attn: bool) -> Result<Self> {
        let r = vb.pp("resnets");
        Ok(Self {
            resnets: vec![
                ResnetBlock2D::load(&r.pp(0), ch, ch, groups)?,
                ResnetBlock2D::load(&r.pp(1), ch, ch, groups)?,
            ],
            attentions: if attn {
                vec![AttentionBlock::load(
                    &vb.pp("attentions").pp(0),
                    ch,
                    groups,
                )?]
            } else {
                vec![]
            },
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut x = self.resnets[0].forward(xs)?;
        if let Some(a) = self.attentions.first() {
            x = a.forward(&x)?;
        }
        self.resnets[1].forward(&x)
    }
}

/// An encoder block: resnets then an optional stride-2 downsampler
/// (zero-padded right/bottom by one, as diffusers' `padding=0`).
#[derive(Debug)]
pub struct DownEncoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Conv2d>,
}

impl DownEncoderBlock2D {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut x = xs.clone();
        for r in &self.resnets {
            x = r.forward(&x)?;
        }
        if let Some(d) = &self.downsampler {
            let p = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            x = d.forward(&p)?;
        }
        Ok(x)
    }
}

/// A decoder block: resnets then an optional nearest-2x upsampler + conv.
#[derive(Debug)]
pub struct UpDecoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Conv2d>,
}

impl UpDecoderBlock2D {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut x = xs.clone();
        for r in &self.resnets {
            x = r.forward(&x)?;
        }
        if let Some(u) = &self.upsampler {
            let (_, _, h, w) = x.dims4()?;
            x = u.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)?;
        }
        Ok(x)
    }
}

/// The VAE encoder: image `[B, 3, H, W]` in [-1, 1] -> moments `[B, 2*latent, H/8, W/8]`.
#[derive(Debug)]
pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    /// Loads `encoder.*`.
    pub fn load(vb: &Vb, c: &VaeConfig) -> Result<Self> {
        let boc = &c.block_out_channels;
        let g = c.norm_num_groups;
        let n = boc.len();
        let mut down_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let vbi = vb.pp("down_blocks").pp(i);
            let mut cin = if i == 0 { boc[0] } else { boc[i - 1] };
            let mut resnets = vec![];
            for j in 0..c.layers_per_block {
                resnets.push(ResnetBlock2D::load(
                    &vbi.pp("resnets").pp(j),
                    cin,
                    boc[i],
                    g,
                )?);
                cin = boc[i];
            }
            let downsampler = if i + 1 < n {
                let v = vbi.pp("downsamplers").pp(0).pp("conv");
                Some(Conv2d::load(&v, boc[i], boc[i], 3, 2, 0, true)?)
            } else {
                None
            };
            down_blocks.push(DownEncoderBlock2D {
                resnets,
                downsampler,
            });
        }
        let last = boc[n - 1];
        Ok(Self {
            conv_in: Conv2d::load(&vb.pp("conv_in"), c.in_channels, boc[0], 3, 1, 1, true)?,
            down_blocks,
            mid_block: MidBlock::load(&vb.pp("mid_block"), last, g, c.mid_block_add_attention)?,
            conv_norm_out: GroupNorm::load(&vb.pp("conv_norm_out"), g, last, EPS)?,
            conv_out: Conv2d::load(
                &vb.pp("conv_out"),
                last,
                2 * c.latent_channels,
                3,
                1,
                1,
                true,
            )?,
        })
    }

    /// Image -> Gaussian moments (before `quant_conv`).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_in.forward(xs)?;
        for b in &self.down_blocks {
            x = b.forward(&x)?;
        }
        let x = self.mid_block.forward(&x)?;
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&x)?)
    }
}

/// The VAE decoder: latents `[B, latent, h, w]` -> image `[B, 3, 8h, 8w]` in about [-1, 1].
#[derive(Debug)]
pub struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    /// Loads `decoder.*`.
    pub fn load(vb: &Vb, c: &VaeConfig) -> Result<Self> {
        let rev: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let g = c.norm_num_groups;
        let n = rev.len();
        let mut up_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let vbi = vb.pp("up_blocks").pp(i);
            let mut cin = if i == 0 { rev[0] } else { rev[i - 1] };
            let mut resnets = vec![];
            for j in 0..c.layers_per_block + 1 {
                resnets.push(ResnetBlock2D::load(
                    &vbi.pp("resnets").pp(j),
                    cin,
                    rev[i],
                    g,
                )?);
                cin = rev[i];
            }
            let upsampler = if i + 1 < n {
                let v = vbi.pp("upsamplers").pp(0).pp("conv");
                Some(Conv2d::load(&v, rev[i], rev[i], 3, 1, 1, true)?)
            } else {
                None
            };
            up_blocks.push(UpDecoderBlock2D { resnets, upsampler });
        }
        Ok(Self {
            conv_in: Conv2d::load(&vb.pp("conv_in"), c.latent_channels, rev[0], 3, 1, 1, true)?,
            mid_block: MidBlock::load(&vb.pp("mid_block"), rev[0], g, c.mid_block_add_attention)?,
            up_blocks,
            conv_norm_out: GroupNorm::load(&vb.pp("conv_norm_out"), g, rev[n - 1], EPS)?,
            conv_out: Conv2d::load(
                &vb.pp("conv_out"),
                rev[n - 1],
                c.out_channels,
                3,
                1,
                1,
                true,
            )?,
        })
    }

    /// Latents (after `post_quant_conv`) -> image.
    pub fn forward(&self, zs: &Tensor) -> Result<Tensor> {
        let mut x = self.mid_block.forward(&self.conv_in.forward(zs)?)?;
        for b in &self.up_blocks {
            x = b.forward(&x)?;
        }
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&x)?)
    }
}

/// The encoder's posterior: a diagonal Gaussian per latent element.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    /// Mean `[B, latent, h, w]`.
    pub mean: Tensor,
    /// Log-variance, clamped to [-30, 20] as diffusers does.
    pub logvar: Tensor,
    /// A point mass at `mean` (a lossless codec): `std` is exactly 0.
    pub deterministic: bool,
}

impl DiagonalGaussian {
    /// Splits moments `[B, 2*latent, h, w]` into mean and log-variance.
    pub fn from_moments(moments: &Tensor) -> Result<Self> {
        let c = moments.dim(1)? / 2;
        Ok(Self {
            mean: moments.narrow(1, 0, c)?,
            logvar: moments.narrow(1, c, c)?.clamp(-30f32, 20f32)?,
            deterministic: false,
        })
    }

    /// A point mass at `mean`, as diffusers' `deterministic=True` posterior:
    /// `std` and `sample` add nothing (log-variance reads the -30 floor).
    pub fn deterministic(mean: Tensor) -> Result<Self> {
        let logvar = (mean.zeros_like()? - 30.0)?;
        Ok(Self {
            mean,
            logvar,
            deterministic: true,
        })
    }

    /// Standard deviation `exp(logvar / 2)` (exactly 0 when deterministic).
    pub fn std(&self) -> Result<Tensor> {
        if self.deterministic {
            return Ok(self.mean.zeros_like()?);
        }
        Ok((&self.logvar * 0.5)?.exp()?)
    }

    /// `mean + std * z` with `z` from the seeded generator.
    pub fn sample(&self, rng: &mut GaussianRng) -> Result<Tensor> {
        if self.deterministic {
            return Ok(self.mean.clone());
        }
        let z = rng.randn(
            self.mean.shape().clone(),
            self.mean.device(),
            self.mean.dtype(),
        )?;
        Ok((&self.mean + (self.std()? * z)?)?)
    }
}

/// diffusers' `AutoencoderKL`.
#[derive(Debug)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: VaeConfig,
}

impl AutoencoderKL {
    /// Builds the VAE from `vb` (rooted at the VAE's keys) following `config`.
    pub fn load(vb: &Vb, config: &VaeConfig) -> Result<Self> {
        let l = config.latent_channels;
        Ok(Self {
            encoder: Encoder::load(&vb.pp("encoder"), config)?,
            decoder: Decoder::load(&vb.pp("decoder"), config)?,
            quant_conv: if config.use_quant_conv {
                Some(Conv2d::load(
                    &vb.pp("quant_conv"),
                    2 * l,
                    2 * l,
                    1,
                    1,
                    0,
                    true,
                )?)
            } else {
                None
            },
            post_quant_conv: if config.use_post_quant_conv {
                Some(Conv2d::load(
                    &vb.pp("post_quant_conv"),
                    l,
                    l,
                    1,
                    1,
                    0,
                    true,
                )?)
            } else {
                None
            },
            config: config.clone(),
        })
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.decoder.conv_in.weight.dtype()
    }

    /// Image in [-1, 1] -> posterior over the raw (unscaled) latents.
    pub fn encode(&self, xs: &Tensor) -> Result<DiagonalGaussian> {
        let m = self.encoder.forward(&xs.to_dtype(self.dtype())?)?;
        let m = match &self.quant_conv {
            Some(q) => q.forward(&m)?,
            None => m,
        };
        DiagonalGaussian::from_moments(&m)
    }

    /// Raw (unscaled) latents -> image in about [-1, 1].
    pub fn decode(&self, zs: &Tensor) -> Result<Tensor> {
        let z = zs.to_dtype(self.dtype())?;
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(&z)?,
            None => z,
        };
        self.decoder.forward(&z)
    }

    /// Diffusion-space latents -> image: `decode(latents / scaling + shift)`.
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let z = (latents * (1.0 / self.config.scaling_factor))?;
        let z = match self.config.shift_factor {
            Some(s) => (z + s)?,
            None => z,
        };
        self.decode(&z)
    }

    /// Raw latents -> diffusion-space latents: `(z - shift) * scaling`.
    pub fn scale_latents(&self, z: &Tensor) -> Result<Tensor> {
        let z = match self.config.shift_factor {
            Some(s) => (z - s)?,
            None => z.clone(),
        };
        Ok((z * self.config.scaling_factor)?)
    }
}

/// `[B, 3, H, W]` image in about [-1, 1] -> RGB8 pixels per batch element,
/// as diffusers' postprocessing: `round(clamp(x / 2 + 0.5, 0, 1) * 255)`.
pub fn to_rgb8(images: &Tensor) -> Result<Vec<Vec<u8>>> {
    let (b, c, _, _) = images.dims4()?;
    ensure!(c == 3, "expected 3 image channels, got {c}");
    let x = ((images.to_dtype(DType::F32)? * 0.5)? + 0.5)?
        .clamp(0f32, 1f32)?
        .permute((0, 2, 3, 1))?
        .contiguous()?
        .to_device(&candle_core::Device::Cpu)?;
    let mut out = Vec::with_capacity(b);
    for i in 0..b {
        let v = x.get(i)?.flatten_all()?.to_vec1::<f32>()?;
        out.push(v.iter().map(|&p| (p * 255.0).round() as u8).collect());
    }
    Ok(out)
}
