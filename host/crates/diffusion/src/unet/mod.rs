//! Our UNet2DConditionModel (SD 1.x, SD 2.x, SDXL) on candle: configuration
//! from diffusers' `unet/config.json` ([`config`]), timestep embeddings
//! ([`embeddings`]), resnet/down/mid/up blocks ([`blocks`]) and the
//! cross-attention transformers ([`attention`]). Every Linear/Conv2d is a
//! LoRA-aware layer from `crate::nn`, reachable by its diffusers module path
//! through [`Adaptable`]; the forward pass takes one timestep per sample and
//! SDXL's added text/time embeddings.

pub mod attention;
pub mod blocks;
pub mod config;
pub mod embeddings;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor};

use crate::nn::{join_path, silu, Activation, Adaptable, Conv2d, GroupNorm, LoraHost};
use crate::weights::Vb;

use blocks::{AttnSpec, DownBlock, DownSpec, MidBlock, ResnetSpec, UpBlock, UpSpec};
pub use config::{BlockKind, TextTimeConfig, UNetConfig};
use embeddings::{timestep_embedding, TimestepEmbedding};

/// SDXL's added conditioning (`added_cond_kwargs` in diffusers).
#[derive(Debug, Clone)]
pub struct SdxlAdded {
    /// Pooled text embedding of text encoder 2, `[B, 1280]`.
    pub text_embeds: Tensor,
    /// Size/crop conditioning `[B, 6]`: original (h, w), crop (top, left), target (h, w).
    pub time_ids: Tensor,
}

/// diffusers' `UNet2DConditionModel`; field names mirror the checkpoint keys.
#[derive(Debug)]
pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<TimestepEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    config: UNetConfig,
}

impl UNet2DConditionModel {
    /// Builds the model from `vb` (rooted at the UNet's keys, e.g. `unet/`'s
    /// safetensors) following `config`. Weights stay as loaded (no copies).
    pub fn load(vb: &Vb, config: &UNetConfig) -> Result<Self> {
        let c = config;
        let n = c.block_out_channels.len();
        let c0 = c.block_out_channels[0];
        let ck = c.conv_in_kernel;
        let conv_in = Conv2d::load(&vb.pp("conv_in"), c.in_channels, c0, ck, 1, ck / 2, true)?;
        let time_embedding =
            TimestepEmbedding::load(&vb.pp("time_embedding"), c0, c.time_embed_dim)?;
        let add_embedding = match &c.addition {
            Some(a) => Some(TimestepEmbedding::load(
                &vb.pp("add_embedding"),
                a.projection_class_embeddings_input_dim,
                c.time_embed_dim,
            )?),
            None => None,
        };
        let resnet = ResnetSpec {
            groups: c.norm_num_groups,
            eps: c.norm_eps,
            temb_channels: c.time_embed_dim,
            output_scale_factor: c.resnet_out_scale_factor,
        };
        let attn = |i: usize, depth: usize| AttnSpec {
            heads: c.num_attention_heads[i],
            depth,
            cross_attention_dim: c.cross_attention_dim[i],
            groups: c.norm_num_groups,
            linear_projection: c.use_linear_projection,
            upcast: c.upcast_attention,
        };

        let vb_down = &vb.pp("down_blocks");
        let mut down_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let spec = DownSpec {
                cin: if i == 0 {
                    c0
                } else {
                    c.block_out_channels[i - 1]
                },
                cout: c.block_out_channels[i],
                layers: c.layers_per_block[i],
                downsample: (i + 1 < n).then_some(c.downsample_padding),
                attn: (c.down_block_types[i] == BlockKind::CrossAttn)
                    .then(|| attn(i, c.transformer_layers_per_block[i])),
            };
            down_blocks.push(
                DownBlock::load(&vb_down.pp(i), spec, resnet)
                    .with_context(|| format!("building unet down_blocks.{i}"))?,
            );
        }

        let last = c.block_out_channels[n - 1];
        let mid_block = if c.mid_block {
            let mid_resnet = ResnetSpec {
                output_scale_factor: c.mid_block_scale_factor,
                ..resnet
            };
            Some(
                MidBlock::load(
                    &vb.pp("mid_block"),
                    last,
                    attn(n - 1, c.transformer_layers_per_block[n - 1]),
                    mid_resnet,
                )
                .context("building unet mid_block")?,
            )
        } else {
            None
        };

        // Up blocks walk the reversed per-block lists, as diffusers does.
        let vb_up = &vb.pp("up_blocks");
        let mut up_blocks = Vec::with_capacity(n);
        let mut prev_cout = last;
        for i in 0..n {
            let r = n - 1 - i; // index into the down-ordered lists
            let cout = c.block_out_channels[r];
            let cin = c.block_out_channels[r.saturating_sub(1)];
            let spec = UpSpec {
                cin,
                prev_cout,
                cout,
                layers: c.layers_per_block[r] + 1,
                upsample: i + 1 < n,
                attn: (c.up_block_types[i] == BlockKind::CrossAttn)
                    .then(|| attn(r, c.reverse_transformer_layers_per_block[i])),
            };
            up_blocks.push(
                UpBlock::load(&vb_up.pp(i), spec, resnet)
                    .with_context(|| format!("building unet up_blocks.{i}"))?,
            );
            prev_cout = cout;
        }

        let conv_norm_out =
            GroupNorm::load(&vb.pp("conv_norm_out"), c.norm_num_groups, c0, c.norm_eps)?;
        let ko = c.conv_out_kernel;
        let conv_out = Conv2d::load(&vb.pp("conv_out"), c0, c.out_channels, ko, 1, ko / 2, true)?;
        Ok(Self {
            conv_in,
            time_embedding,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            config: config.clone(),
        })
    }

    /// The resolved configuration.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Predicts noise (or v) for `sample` `[B, C, H, W]` at `timesteps` (`[B]`, one
    /// per sample; a scalar or `[1]` is broadcast) given the text context
    /// `encoder_hidden_states` `[B, 77, cross_attention_dim]`; `added` is required
    /// for SDXL (`addition_embed_type = "text_time"`) and rejected otherwise.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&SdxlAdded>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, _, h, w) = sample.dims4().context("unet sample must be [B, C, H, W]")?;
        let dtype = sample.dtype();
        let timesteps = match timesteps.dims() {
            [] | [1] => timesteps.reshape(1)?.broadcast_as(b)?,
            [tb] if *tb == b => timesteps.clone(),
            d => bail!("unet: timesteps must be [B] = [{b}] (or a scalar), got {d:?}"),
        };
        let context = encoder_hidden_states;
        ensure!(
            context.rank() == 3 && context.dim(0)? == b,
            "unet: encoder_hidden_states must be [{b}, tokens, dim], got {:?}",
            context.dims()
        );

        // 1. time (and SDXL's added) embeddings
        let c0 = c.block_out_channels[0];
        let t_emb =
            timestep_embedding(&timesteps, c0, c.flip_sin_to_cos, c.freq_shift)?.to_dtype(dtype)?;
        let mut emb = self.time_embedding.forward(&t_emb)?;
        match (&self.add_embedding, &c.addition, added) {
            (Some(add_embedding), Some(cfg), Some(added)) => {
                let ids = &added.time_ids;
                ensure!(
                    ids.rank() == 2 && ids.dim(0)? == b,
                    "unet: SDXL time_ids must be [{b}, n], got {:?}",
                    ids.dims()
                );
                let time_embeds = timestep_embedding(
                    &ids.flatten_all()?,
                    cfg.addition_time_embed_dim,
                    c.flip_sin_to_cos,
                    c.freq_shift,
                )?
                .reshape((b, ()))?
                .to_dtype(dtype)?;
                let text = added.text_embeds.to_dtype(dtype)?;
                let add = Tensor::cat(&[&text, &time_embeds], 1)?;
                emb = (emb + add_embedding.forward(&add)?)?;
            }
            (Some(_), _, None) => bail!(
                "unet: this is an SDXL-style UNet (addition_embed_type \"text_time\"): \
                 pass the pooled text embedding and time ids"
            ),
            (None, _, Some(_)) => {
                bail!("unet: added SDXL embeddings were given but this UNet takes none")
            }
            _ => {}
        }
        let temb_act = silu(&emb)?;

        // 2. pre-process
        let sample = if c.center_input_sample {
            sample.affine(2.0, -1.0)?
        } else {
            sample.clone()
        };
        let mut xs = self.conv_in.forward(&sample)?;

        // 3. down
        let mut skips = vec![xs.clone()];
        for block in &self.down_blocks {
            xs = block.forward(&xs, &temb_act, context, &mut skips)?;
        }

        // 4. mid
        if let Some(mid) = &self.mid_block {
            xs = mid.forward(&xs, &temb_act, context)?;
        }

        // 5. up (explicit upsample sizes when H or W is not a multiple of 2^ups)
        let factor = 1usize << (self.up_blocks.len() - 1);
        let odd_size = h % factor != 0 || w % factor != 0;
        let n_up = self.up_blocks.len();
        for (i, block) in self.up_blocks.iter().enumerate() {
            let upsample_size = if i + 1 < n_up && odd_size {
                let idx = skips
                    .len()
                    .checked_sub(block.num_skips() + 1)
                    .context("unet: skip connections do not match the up blocks")?;
                let (_, _, sh, sw) = skips[idx].dims4()?;
                Some((sh, sw))
            } else {
                None
            };
            xs = block.forward(&xs, &mut skips, &temb_act, context, upsample_size)?;
        }

        // 6. post-process
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }

    /// Switches the GEGLU activation of every transformer: diffusers uses
    /// erf GELU (the default); `GeluTanh` reproduces candle-transformers' UNet.
    pub fn set_geglu_activation(&mut self, act: Activation) {
        self.down_blocks
            .iter_mut()
            .for_each(|b| b.set_geglu_activation(act));
        if let Some(m) = &mut self.mid_block {
            m.set_geglu_activation(act);
        }
        self.up_blocks
            .iter_mut()
            .for_each(|b| b.set_geglu_activation(act));
    }

    /// The dtype of the weights as loaded.
    pub fn dtype(&self) -> DType {
        self.conv_in.weight.dtype()
    }
}

impl Adaptable for UNet2DConditionModel {
    fn visit_adaptable(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut dyn LoraHost)) {
        self.conv_in
            .visit_adaptable(&join_path(prefix, "conv_in"), f);
        self.time_embedding
            .visit_adaptable(&join_path(prefix, "time_embedding"), f);
        if let Some(a) = &mut self.add_embedding {
            a.visit_adaptable(&join_path(prefix, "add_embedding"), f);
        }
        for (i, b) in self.down_blocks.iter_mut().enumerate() {
            b.visit_adaptable(&join_path(prefix, &format!("down_blocks.{i}")), f);
        }
        if let Some(m) = &mut self.mid_block {
            m.visit_adaptable(&join_path(prefix, "mid_block"), f);
        }
        for (i, b) in self.up_blocks.iter_mut().enumerate() {
            b.visit_adaptable(&join_path(prefix, &format!("up_blocks.{i}")), f);
        }
        self.conv_out
            .visit_adaptable(&join_path(prefix, "conv_out"), f);
    }
}
