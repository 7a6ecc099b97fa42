//! The UNet's convolutional blocks, named like diffusers' checkpoint keys:
//! `ResnetBlock2D` (`norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2`,
//! `conv_shortcut`), `downsamplers.0.conv`, `upsamplers.0.conv`, and the down /
//! mid / up blocks (with or without cross-attention transformers).

use anyhow::{ensure, Result};
use candle_core::Tensor;

use crate::nn::{join_path, Activation, Adaptable, Conv2d, GroupNorm, Linear, LoraHost};
use crate::weights::Vb;

use super::attention::{Transformer2DModel, TransformerSpec};

/// diffusers' `ResnetBlock2D` (`time_embedding_norm="default"`, SiLU).
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

/// Shared settings of the resnets of one UNet.
#[derive(Debug, Clone, Copy)]
pub struct ResnetSpec {
    /// GroupNorm groups.
    pub groups: usize,
    /// GroupNorm epsilon.
    pub eps: f64,
    /// Width of the time embedding.
    pub temb_channels: usize,
    /// The output is divided by this.
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    /// Loads a resnet `cin -> cout` under `vb` (1x1 `conv_shortcut` when they differ).
    pub fn load(vb: &Vb, cin: usize, cout: usize, spec: ResnetSpec) -> Result<Self> {
        let conv_shortcut = if cin != cout {
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
        };
        Ok(Self {
            norm1: GroupNorm::load(&vb.pp("norm1"), spec.groups, cin, spec.eps)?,
            conv1: Conv2d::load(&vb.pp("conv1"), cin, cout, 3, 1, 1, true)?,
            time_emb_proj: Linear::load(&vb.pp("time_emb_proj"), spec.temb_channels, cout, true)?,
            norm2: GroupNorm::load(&vb.pp("norm2"), spec.groups, cout, spec.eps)?,
            conv2: Conv2d::load(&vb.pp("conv2"), cout, cout, 3, 1, 1, true)?,
            conv_shortcut,
            output_scale_factor: spec.output_scale_factor,
        })
    }

    /// `xs: [B, cin, H, W]`, `temb_act`: the time embedding after SiLU, `[B, temb]`.
    pub fn forward(&self, xs: &Tensor, temb_act: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(xs)?)?;
        let t = self
            .time_emb_proj
            .forward(temb_act)?
            .unsqueeze(2)?
            .unsqueeze(3)?;
        let h = h.broadcast_add(&t)?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(xs)?,
            None => xs.clone(),
        };
        let out = (shortcut + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            Ok((out / self.output_scale_factor)?)
        }
    }
}

impl Adaptable for ResnetBlock2D {
    fn visit_adaptable(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut dyn LoraHost)) {
        self.conv1.visit_adaptable(&join_path(prefix, "conv1"), f);
        self.time_emb_proj
            .visit_adaptable(&join_path(prefix, "time_emb_proj"), f);
        self.conv2.visit_adaptable(&join_path(prefix, "conv2"), f);
        if let Some(c) = &mut self.conv_shortcut {
            c.visit_adaptable(&join_path(prefix, "conv_shortcut"), f);
        }
    }
}

/// `downsamplers.0`: a stride-2 3x3 conv (`conv`).
#[derive(Debug)]
pub struct Downsample2D {
    conv: Conv2d,
    padding: usize,
}

impl Downsample2D {
    fn load(vb: &Vb, channels: usize, padding: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::load(&vb.pp("conv"), channels, channels, 3, 2, padding, true)?,
            padding,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.padding == 0 {
            // diffusers pads (0, 1, 0, 1) when downsample_padding is 0.
            let xs = xs.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            self.conv.forward(&xs)
        } else {
            self.conv.forward(xs)
        }
    }
}

/// `upsamplers.0`: nearest 2x (or to the skip's size) then a 3x3 conv (`conv`).
#[derive(Debug)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    fn load(vb: &Vb, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::load(&vb.pp("conv"), channels, channels, 3, 1, 1, true)?,
        })
    }

    fn forward(&self, xs: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        self.conv.forward(&xs.upsample_nearest2d(th, tw)?)
    }
}

/// Settings of the transformers of one block (None for plain blocks).
#[derive(Debug, Clone, Copy)]
pub struct AttnSpec {
    /// Heads per attention.
    pub heads: usize,
    /// Transformer blocks per attention.
    pub depth: usize,
    /// Text context width.
    pub cross_attention_dim: usize,
    /// GroupNorm groups.
    pub groups: usize,
    /// Linear projections (SD2/SDXL).
    pub linear_projection: bool,
    /// Upcast attention.
    pub upcast: bool,
}

impl AttnSpec {
    fn transformer(&self, channels: usize) -> TransformerSpec {
        TransformerSpec {
            channels,
            heads: self.heads,
            depth: self.depth,
            cross_attention_dim: self.cross_attention_dim,
            groups: self.groups,
            linear_projection: self.linear_projection,
            upcast: self.upcast,
        }
    }
}

/// `DownBlock2D` (no attentions) or `CrossAttnDownBlock2D`.
#[derive(Debug)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

/// Construction parameters of a down block.
#[derive(Debug, Clone, Copy)]
pub struct DownSpec {
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Number of resnets.
    pub layers: usize,
    /// Add a downsampler (all but the last block).
    pub downsample: Option<usize>,
    /// Transformers after each resnet.
    pub attn: Option<AttnSpec>,
}

impl DownBlock {
    /// Loads `down_blocks.N` under `vb`.
    pub fn load(vb: &Vb, spec: DownSpec, resnet: ResnetSpec) -> Result<Self> {
        let mut resnets = Vec::with_capacity(spec.layers);
        let mut attentions = Vec::new();
        for j in 0..spec.layers {
            let cin = if j == 0 { spec.cin } else { spec.cout };
            resnets.push(ResnetBlock2D::load(
                &vb.pp("resnets").pp(j),
                cin,
                spec.cout,
                resnet,
            )?);
            if let Some(a) = &spec.attn {
                attentions.push(Transformer2DModel::load(
                    &vb.pp("attentions").pp(j),
                    a.transformer(spec.cout),
                )?);
            }
        }
        let downsampler = match spec.downsample {
            Some(pad) => Some(Downsample2D::load(
                &vb.pp("downsamplers").pp(0),
                spec.cout,
                pad,
            )?),
            None => None,
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// Returns the block output and the skip tensors it contributes.
    pub fn forward(
        &self,
        xs: &Tensor,
        temb_act: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (j, r) in self.resnets.iter().enumerate() {
            xs = r.forward(&xs, temb_act)?;
            if let Some(a) = self.attentions.get(j) {
                xs = a.forward(&xs, context)?;
            }
            skips.push(xs.clone());
        }
        if let Some(d) = &self.downsampler {
            xs = d.forward(&xs)?;
            skips.push(xs.clone());
        }
        Ok(xs)
    }

    /// Switches the GEGLU activation of this block's transformers.
    pub fn set_geglu_activation(&mut self, act: Activation) {
        self.attentions
            .iter_mut()
            .for_each(|a| a.set_geglu_activation(act));
    }
}

impl Adaptable for DownBlock {
    fn visit_adaptable(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut dyn LoraHost)) {
        for (j, r) in self.resnets.iter_mut().enumerate() {
            r.visit_adaptable(&join_path(prefix, &format!("resnets.{j}")), f);
        }
        for (j, a) in self.attentions.iter_mut().enumerate() {
            a.visit_adaptable(&join_path(prefix, &format!("attentions.{j}")), f);
        }
        if let Some(d) = &mut self.downsampler {
            d.conv
                .visit_adaptable(&join_path(prefix, "downsamplers.0.conv"), f);
        }
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) pairs.
#[derive(Debug)]
pub struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    /// Loads `mid_block` (one attention, as diffusers' default `num_layers=1`).
    pub fn load(vb: &Vb, channels: usize, attn: AttnSpec, resnet: ResnetSpec) -> Result<Self> {
        let resnets = (0..2)
            .map(|j| ResnetBlock2D::load(&vb.pp("resnets").pp(j), channels, channels, resnet))
            .collect::<Result<Vec<_>>>()?;
        let attentions = vec![Transformer2DModel::load(
            &vb.pp("attentions").pp(0),
            attn.transformer(channels),
        )?];
        Ok(Self {
            resnets,
            attentions,
        })
    }

    /// Applies the mid block.
    pub fn forward(&self, xs: &Tensor, temb_act: &Tensor, context: &Tensor) -> Result<Tensor> {
        let mut xs = self.resnets[0].forward(xs, temb_act)?;
        for (a, r) in self.attentions.iter().zip(&self.resnets[1..]) {
            xs = a.forward(&xs, context)?;
            xs = r.forward(&xs, temb_act)?;
        }
        Ok(xs)
    }

    /// Switches the GEGLU activation of this block's transformers.
    pub fn set_geglu_activation(&mut self, act: Activation) {
        self.attentions
            .iter_mut()
            .for_each(|a| a.set_geglu_activation(act));
    }
}

impl Adaptable for MidBlock {
    fn visit_adaptable(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut dyn LoraHost)) {
        for (j, r) in self.resnets.iter_mut().enumerate() {
            r.visit_adaptable(&join_path(prefix, &format!("resnets.{j}")), f);
        }
        for (j, a) in self.attentions.iter_mut().enumerate() {
            a.visit_adaptable(&join_path(prefix, &format!("attentions.{j}")), f);
        }
    }
}

/// `UpBlock2D` (no attentions) or `CrossAttnUpBlock2D`.
#[derive(Debug)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

/// Construction parameters of an up block.
#[derive(Debug, Clone, Copy)]
pub struct UpSpec {
    /// Channels of the skip from the matching down block's input.
    pub cin: usize,
    /// Channels coming from the previous up block.
    pub prev_cout: usize,
    /// Output channels.
    pub cout: usize,
    /// Number of resnets (layers_per_block + 1).
    pub layers: usize,
    /// Add an upsampler (all but the last block).
    pub upsample: bool,
    /// Transformers after each resnet.
    pub attn: Option<AttnSpec>,
}

impl UpBlock {
    /// Loads `up_blocks.N` under `vb`.
    pub fn load(vb: &Vb, spec: UpSpec, resnet: ResnetSpec) -> Result<Self> {
        let mut resnets = Vec::with_capacity(spec.layers);
        let mut attentions = Vec::new();
        for j in 0..spec.layers {
            let skip = if j == spec.layers - 1 {
                spec.cin
            } else {
                spec.cout
            };
            let r_in = if j == 0 { spec.prev_cout } else { spec.cout };
            resnets.push(ResnetBlock2D::load(
                &vb.pp("resnets").pp(j),
                r_in + skip,
                spec.cout,
                resnet,
            )?);
            if let Some(a) = &spec.attn {
                attentions.push(Transformer2DModel::load(
                    &vb.pp("attentions").pp(j),
                    a.transformer(spec.cout),
                )?);
            }
        }
        let upsampler = if spec.upsample {
            Some(Upsample2D::load(&vb.pp("upsamplers").pp(0), spec.cout)?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    /// Number of skip tensors the block consumes.
    pub fn num_skips(&self) -> usize {
        self.resnets.len()
    }

    /// Consumes skips from the end of `skips` (one per resnet).
    pub fn forward(
        &self,
        xs: &Tensor,
        skips: &mut Vec<Tensor>,
        temb_act: &Tensor,
        context: &Tensor,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (j, r) in self.resnets.iter().enumerate() {
            let skip = skips.pop();
            ensure!(skip.is_some(), "unet: ran out of skip connections");
            xs = Tensor::cat(&[&xs, &skip.unwrap()], 1)?;
            xs = r.forward(&xs, temb_act)?;
            if let Some(a) = self.attentions.get(j) {
                xs = a.forward(&xs, context)?;
            }
        }
        if let Some(u) = &self.upsampler {
            xs = u.forward(&xs, upsample_size)?;
        }
        Ok(xs)
    }

    /// Switches the GEGLU activation of this block's transformers.
    pub fn set_geglu_activation(&mut self, act: Activation) {
        self.attentions
            .iter_mut()
            .for_each(|a| a.set_geglu_activation(act));
    }
}

impl Adaptable for UpBlock {
    fn visit_adaptable(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut dyn LoraHost)) {
        for (j, r) in self.resnets.iter_mut().enumerate() {
            r.visit_adaptable(&join_path(prefix, &format!("resnets.{j}")), f);
        }
        for (j, a) in self.attentions.iter_mut().enumerate() {
            a.visit_adaptable(&join_path(prefix, &format!("attentions.{j}")), f);
        }
        if let Some(u) = &mut self.upsampler {
            u.conv
                .visit_adaptable(&join_path(prefix, "upsamplers.0.conv"), f);
        }
    }
}
