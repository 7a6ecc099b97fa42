//! UNet configuration: reads a diffusers `unet/config.json` completely and
//! resolves its per-block lists (ints or lists, SD2's `attention_head_dim`
//! quirk, SDXL's transformer depths and added embeddings) into [`UNetConfig`].

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::Path;

/// A config value that diffusers accepts either as one value or one per block.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    fn per_block(&self, n: usize, key: &str) -> Result<Vec<T>> {
        match self {
            OneOrMany::One(v) => Ok(vec![v.clone(); n]),
            OneOrMany::Many(v) if v.len() == n => Ok(v.clone()),
            OneOrMany::Many(v) => bail!(
                "unet config: `{key}` has {} entries but there are {n} down blocks",
                v.len()
            ),
        }
    }
}

/// The raw JSON as diffusers writes it (unknown keys are ignored).
#[derive(Debug, Clone, Deserialize)]
struct RawConfig {
    #[serde(default = "default_channels")]
    in_channels: usize,
    #[serde(default = "default_channels")]
    out_channels: usize,
    #[serde(default)]
    center_input_sample: bool,
    #[serde(default = "default_true")]
    flip_sin_to_cos: bool,
    #[serde(default)]
    freq_shift: f64,
    #[serde(default = "default_down_types")]
    down_block_types: Vec<String>,
    #[serde(default = "default_mid_type")]
    mid_block_type: Option<String>,
    #[serde(default = "default_up_types")]
    up_block_types: Vec<String>,
    #[serde(default)]
    only_cross_attention: Option<OneOrMany<bool>>,
    #[serde(default = "default_block_out")]
    block_out_channels: Vec<usize>,
    #[serde(default = "default_layers")]
    layers_per_block: OneOrMany<usize>,
    #[serde(default = "default_one_usize")]
    downsample_padding: usize,
    #[serde(default = "default_one_f64")]
    mid_block_scale_factor: f64,
    #[serde(default = "default_silu")]
    act_fn: String,
    #[serde(default = "default_groups")]
    norm_num_groups: Option<usize>,
    #[serde(default = "default_eps")]
    norm_eps: f64,
    #[serde(default = "default_cross_dim")]
    cross_attention_dim: OneOrMany<usize>,
    #[serde(default = "default_one_layers")]
    transformer_layers_per_block: OneOrMany<usize>,
    #[serde(default)]
    reverse_transformer_layers_per_block: Option<Vec<usize>>,
    #[serde(default)]
    encoder_hid_dim_type: Option<String>,
    #[serde(default = "default_head_dim")]
    attention_head_dim: OneOrMany<usize>,
    #[serde(default)]
    num_attention_heads: Option<OneOrMany<usize>>,
    #[serde(default)]
    dual_cross_attention: bool,
    #[serde(default)]
    use_linear_projection: bool,
    #[serde(default)]
    class_embed_type: Option<String>,
    #[serde(default)]
    addition_embed_type: Option<String>,
    #[serde(default)]
    addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    num_class_embeds: Option<usize>,
    #[serde(default)]
    upcast_attention: bool,
    #[serde(default = "default_shift")]
    resnet_time_scale_shift: String,
    #[serde(default)]
    resnet_skip_time_act: bool,
    #[serde(default = "default_one_f64")]
    resnet_out_scale_factor: f64,
    #[serde(default = "default_positional")]
    time_embedding_type: String,
    #[serde(default)]
    time_embedding_dim: Option<usize>,
    #[serde(default)]
    time_embedding_act_fn: Option<String>,
    #[serde(default)]
    timestep_post_act: Option<String>,
    #[serde(default)]
    time_cond_proj_dim: Option<usize>,
    #[serde(default = "default_kernel")]
    conv_in_kernel: usize,
    #[serde(default = "default_kernel")]
    conv_out_kernel: usize,
    #[serde(default)]
    projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    attention_type: Option<String>,
    #[serde(default)]
    cross_attention_norm: Option<String>,
    #[serde(default)]
    sample_size: Option<usize>,
}

fn default_channels() -> usize {
    4
}
fn default_true() -> bool {
    true
}
fn default_down_types() -> Vec<String> {
    [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn default_up_types() -> Vec<String> {
    [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn default_mid_type() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn default_block_out() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn default_layers() -> OneOrMany<usize> {
    OneOrMany::One(2)
}
fn default_one_usize() -> usize {
    1
}
fn default_one_f64() -> f64 {
    1.0
}
fn default_silu() -> String {
    "silu".into()
}
fn default_groups() -> Option<usize> {
    Some(32)
}
fn default_eps() -> f64 {
    1e-5
}
fn default_cross_dim() -> OneOrMany<usize> {
    OneOrMany::One(1280)
}
fn default_one_layers() -> OneOrMany<usize> {
    OneOrMany::One(1)
}
fn default_head_dim() -> OneOrMany<usize> {
    OneOrMany::One(8)
}
fn default_shift() -> String {
    "default".into()
}
fn default_positional() -> String {
    "positional".into()
}
fn default_kernel() -> usize {
    3
}

/// Kind of a down or up block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// `DownBlock2D` / `UpBlock2D`: resnets only.
    Plain,
    /// `CrossAttnDownBlock2D` / `CrossAttnUpBlock2D`: resnets + transformers.
    CrossAttn,
}

/// SDXL's `addition_embed_type: "text_time"` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextTimeConfig {
    /// Width of the sinusoidal embedding of each time id (256 for SDXL).
    pub addition_time_embed_dim: usize,
    /// Input width of `add_embedding.linear_1` (pooled text + 6 time ids).
    pub projection_class_embeddings_input_dim: usize,
}

/// A resolved UNet2DConditionModel configuration (lists expanded per down block).
#[derive(Debug, Clone, PartialEq)]
pub struct UNetConfig {
    /// Latent channels in.
    pub in_channels: usize,
    /// Latent channels out.
    pub out_channels: usize,
    /// Map the input from [0,1] to [-1,1] first (false for SD).
    pub center_input_sample: bool,
    /// Sinusoidal embedding order: cos first when true.
    pub flip_sin_to_cos: bool,
    /// `downscale_freq_shift` of the sinusoidal embedding.
    pub freq_shift: f64,
    /// Down block kinds, in order.
    pub down_block_types: Vec<BlockKind>,
    /// Up block kinds, in order.
    pub up_block_types: Vec<BlockKind>,
    /// Whether there is a `UNetMidBlock2DCrossAttn` (false: no mid block).
    pub mid_block: bool,
    /// Output channels of each down block.
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: Vec<usize>,
    /// Padding of the downsampler convs.
    pub downsample_padding: usize,
    /// Output scale of the mid block's resnets.
    pub mid_block_scale_factor: f64,
    /// Output scale of the other resnets.
    pub resnet_out_scale_factor: f64,
    /// GroupNorm groups.
    pub norm_num_groups: usize,
    /// GroupNorm epsilon of resnets and the output norm.
    pub norm_eps: f64,
    /// Context width of the cross-attention, per down block.
    pub cross_attention_dim: Vec<usize>,
    /// Transformer blocks per attention, per down block.
    pub transformer_layers_per_block: Vec<usize>,
    /// Transformer blocks per attention of the up blocks (diffusers' reverse list), per up block.
    pub reverse_transformer_layers_per_block: Vec<usize>,
    /// Attention heads per down block (resolves SD2's `attention_head_dim` quirk).
    pub num_attention_heads: Vec<usize>,
    /// Linear (SD2/SDXL) rather than 1x1-conv `proj_in`/`proj_out`.
    pub use_linear_projection: bool,
    /// Compute attention scores in f32 when the model runs in f16/bf16.
    pub upcast_attention: bool,
    /// Width of the time embedding (`block_out_channels[0] * 4` by default).
    pub time_embed_dim: usize,
    /// SDXL added embeddings, when `addition_embed_type` is `"text_time"`.
    pub addition: Option<TextTimeConfig>,
    /// Kernel size of `conv_in`.
    pub conv_in_kernel: usize,
    /// Kernel size of `conv_out`.
    pub conv_out_kernel: usize,
    /// Native latent size (informational).
    pub sample_size: Option<usize>,
}

fn block_kind(name: &str, down: bool) -> Result<BlockKind> {
    match (name, down) {
        ("DownBlock2D", true) | ("UpBlock2D", false) => Ok(BlockKind::Plain),
        ("CrossAttnDownBlock2D", true) | ("CrossAttnUpBlock2D", false) => Ok(BlockKind::CrossAttn),
        _ => bail!(
            "unet config: block type `{name}` is not supported (supported: DownBlock2D, \
             CrossAttnDownBlock2D, UpBlock2D, CrossAttnUpBlock2D)"
        ),
    }
}

impl UNetConfig {
    /// Reads and resolves `unet/config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading UNet config {}", path.display()))?;
        Self::from_json_str(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Parses and resolves the JSON text of a diffusers UNet config.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text).context("parsing UNet config JSON")?;
        Self::resolve(raw)
    }

    fn resolve(raw: RawConfig) -> Result<Self> {
        let n = raw.block_out_channels.len();
        if n == 0 {
            bail!("unet config: `block_out_channels` is empty");
        }
        if raw.down_block_types.len() != n || raw.up_block_types.len() != n {
            bail!(
                "unet config: {} down and {} up block types for {n} block_out_channels",
                raw.down_block_types.len(),
                raw.up_block_types.len()
            );
        }
        let unsupported = |what: &str| -> Result<Self> {
            bail!("unet config: {what} is not supported by selma's UNet")
        };
        if raw.act_fn != "silu" {
            return unsupported(&format!("act_fn `{}`", raw.act_fn));
        }
        if raw.dual_cross_attention {
            return unsupported("dual_cross_attention");
        }
        if raw.class_embed_type.is_some() || raw.num_class_embeds.is_some() {
            return unsupported("class embeddings (class_embed_type / num_class_embeds)");
        }
        if raw.encoder_hid_dim_type.is_some() {
            return unsupported("encoder_hid_dim_type");
        }
        if raw.resnet_time_scale_shift != "default" {
            return unsupported(&format!(
                "resnet_time_scale_shift `{}`",
                raw.resnet_time_scale_shift
            ));
        }
        if raw.resnet_skip_time_act {
            return unsupported("resnet_skip_time_act");
        }
        if raw.time_embedding_type != "positional" {
            return unsupported(&format!(
                "time_embedding_type `{}`",
                raw.time_embedding_type
            ));
        }
        if raw.time_embedding_act_fn.is_some() || raw.timestep_post_act.is_some() {
            return unsupported("time_embedding_act_fn / timestep_post_act");
        }
        if raw.time_cond_proj_dim.is_some() {
            return unsupported("time_cond_proj_dim (LCM guidance embedding)");
        }
        if raw.attention_type.as_deref().unwrap_or("default") != "default" {
            return unsupported("attention_type other than `default`");
        }
        if raw.cross_attention_norm.is_some() {
            return unsupported("cross_attention_norm");
        }
        if let Some(oca) = &raw.only_cross_attention {
            if oca.per_block(n, "only_cross_attention")?.iter().any(|&b| b) {
                return unsupported("only_cross_attention");
            }
        }
        let mid_block = match raw.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => true,
            None => false,
            Some(other) => return unsupported(&format!("mid_block_type `{other}`")),
        };
        let addition = match raw.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => Some(TextTimeConfig {
                addition_time_embed_dim: raw.addition_time_embed_dim.context(
                    "unet config: addition_embed_type `text_time` needs addition_time_embed_dim",
                )?,
                projection_class_embeddings_input_dim: raw
                    .projection_class_embeddings_input_dim
                    .context(
                        "unet config: addition_embed_type `text_time` needs \
                         projection_class_embeddings_input_dim",
                    )?,
            }),
            Some(other) => return unsupported(&format!("addition_embed_type `{other}`")),
        };
        if raw.conv_in_kernel.is_multiple_of(2) || raw.conv_out_kernel.is_multiple_of(2) {
            bail!("unet config: conv_in_kernel / conv_out_kernel must be odd");
        }
        let down_block_types = raw
            .down_block_types
            .iter()
            .map(|s| block_kind(s, true))
            .collect::<Result<Vec<_>>>()?;
        let up_block_types = raw
            .up_block_types
            .iter()
            .map(|s| block_kind(s, false))
            .collect::<Result<Vec<_>>>()?;
        // diffusers: `num_attention_heads = num_attention_heads or attention_head_dim`
        // (the historical naming mistake: SD's `attention_head_dim` is the head count).
        let num_attention_heads = match &raw.num_attention_heads {
            Some(h) => h.per_block(n, "num_attention_heads")?,
            None => raw.attention_head_dim.per_block(n, "attention_head_dim")?,
        };
        let transformer_layers_per_block = raw
            .transformer_layers_per_block
            .per_block(n, "transformer_layers_per_block")?;
        let reverse_transformer_layers_per_block = match raw.reverse_transformer_layers_per_block {
            Some(v) if v.len() == n => v,
            Some(v) => bail!(
                "unet config: reverse_transformer_layers_per_block has {} entries, expected {n}",
                v.len()
            ),
            None => transformer_layers_per_block.iter().rev().copied().collect(),
        };
        let norm_num_groups = raw
            .norm_num_groups
            .context("unet config: norm_num_groups null is not supported")?;
        for &c in &raw.block_out_channels {
            if c % norm_num_groups != 0 {
                bail!("unet config: block_out_channels {c} not divisible by norm_num_groups {norm_num_groups}");
            }
        }
        let heads_ok = raw
            .block_out_channels
            .iter()
            .zip(&num_attention_heads)
            .all(|(&c, &h)| h > 0 && c % h == 0);
        if !heads_ok {
            bail!(
                "unet config: block_out_channels {:?} not divisible by the head counts {:?}",
                raw.block_out_channels,
                num_attention_heads
            );
        }
        Ok(Self {
            in_channels: raw.in_channels,
            out_channels: raw.out_channels,
            center_input_sample: raw.center_input_sample,
            flip_sin_to_cos: raw.flip_sin_to_cos,
            freq_shift: raw.freq_shift,
            down_block_types,
            up_block_types,
            mid_block,
            time_embed_dim: raw
                .time_embedding_dim
                .unwrap_or(raw.block_out_channels[0] * 4),
            layers_per_block: raw.layers_per_block.per_block(n, "layers_per_block")?,
            cross_attention_dim: raw
                .cross_attention_dim
                .per_block(n, "cross_attention_dim")?,
            block_out_channels: raw.block_out_channels,
            downsample_padding: raw.downsample_padding,
            mid_block_scale_factor: raw.mid_block_scale_factor,
            resnet_out_scale_factor: raw.resnet_out_scale_factor,
            norm_num_groups,
            norm_eps: raw.norm_eps,
            transformer_layers_per_block,
            reverse_transformer_layers_per_block,
            num_attention_heads,
            use_linear_projection: raw.use_linear_projection,
            upcast_attention: raw.upcast_attention,
            addition,
            conv_in_kernel: raw.conv_in_kernel,
            conv_out_kernel: raw.conv_out_kernel,
            sample_size: raw.sample_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd2_head_dim_quirk_and_sdxl_lists() {
        let sd2 = r#"{"attention_head_dim":[5,10,20,20],"use_linear_projection":true,
            "cross_attention_dim":1024}"#;
        let c = UNetConfig::from_json_str(sd2).unwrap();
        assert_eq!(c.num_attention_heads, vec![5, 10, 20, 20]);
        assert!(c.use_linear_projection);
        assert_eq!(c.cross_attention_dim, vec![1024; 4]);
        assert_eq!(c.time_embed_dim, 1280);

        let xl = r#"{"block_out_channels":[320,640,1280],"attention_head_dim":[5,10,20],
            "down_block_types":["DownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D"],
            "up_block_types":["CrossAttnUpBlock2D","CrossAttnUpBlock2D","UpBlock2D"],
            "transformer_layers_per_block":[1,2,10],"addition_embed_type":"text_time",
            "addition_time_embed_dim":256,"projection_class_embeddings_input_dim":2816}"#;
        let c = UNetConfig::from_json_str(xl).unwrap();
        assert_eq!(c.reverse_transformer_layers_per_block, vec![10, 2, 1]);
        assert_eq!(
            c.addition,
            Some(TextTimeConfig {
                addition_time_embed_dim: 256,
                projection_class_embeddings_input_dim: 2816
            })
        );
        let bad = r#"{"class_embed_type":"timestep"}"#;
        let err = UNetConfig::from_json_str(bad).unwrap_err().to_string();
        assert!(err.contains("class"), "{err}");
    }
}
