//! CLIP text encoders as diffusers folders hold them (`text_encoder/`,
//! `text_encoder_2/`): `CLIPTextModel` (SD 1.x CLIP-L, SD 2.x OpenCLIP-H) and
//! `CLIPTextModelWithProjection` (SDXL's OpenCLIP-bigG), configured from
//! `config.json`, LoRA-aware (every q/k/v/out projection and MLP linear),
//! with causal self-attention, any hidden layer as output (SDXL and clip-skip
//! use `hidden_states[-2]` without the final norm) and the pooled eos
//! embedding (projected for SDXL's second encoder).

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use serde::Deserialize;

use crate::nn::{
    attention, causal_mask, join_path, merge_heads, split_heads, Activation, Adaptable, Embedding,
    LayerNorm, Linear, LoraHost,
};
use crate::weights::Vb;

fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "quick_gelu".into()
}
fn default_bos() -> u32 {
    49406
}
fn default_eos() -> u32 {
    49407
}
fn default_max_pos() -> usize {
    77
}

/// The fields of a transformers `CLIPTextConfig` (`config.json`) we use.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Positions (77).
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// `quick_gelu` (CLIP-L) or `gelu` (OpenCLIP, exact erf GELU).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Width of `text_projection` (CLIPTextModelWithProjection).
    #[serde(default)]
    pub projection_dim: Option<usize>,
    /// Beginning-of-text id.
    #[serde(default = "default_bos")]
    pub bos_token_id: u32,
    /// End-of-text id; 2 means "legacy config: pool at argmax(ids)".
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
}

impl ClipTextConfig {
    /// Parses `config.json` text.
    pub fn from_json(text: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(text).context("parsing CLIP text config")?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads `path` (a `config.json`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("in {}", path.display()))
    }

    fn validate(&self) -> Result<()> {
        ensure!(
            self.num_attention_heads > 0
                && self.hidden_size.is_multiple_of(self.num_attention_heads),
            "hidden_size {} is not divisible by num_attention_heads {}",
            self.hidden_size,
            self.num_attention_heads
        );
        Activation::from_name(&self.hidden_act)?;
        Ok(())
    }

    /// The parsed activation.
    pub fn activation(&self) -> Result<Activation> {
        Activation::from_name(&self.hidden_act)
    }
}

/// Which hidden state a forward pass returns as `hidden`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiddenLayer {
    /// `last_hidden_state`: the last layer's output after `final_layer_norm`
    /// (SD 1.x, SD 2.x).
    Last,
    /// `hidden_states[-k]` (k >= 1; `hidden_states[0]` is the embeddings),
    /// with or without `final_layer_norm`. SDXL: `FromEnd { k: 2, final_norm: false }`;
    /// diffusers' `clip_skip = n` for SD 1.x: `FromEnd { k: n + 1, final_norm: true }`.
    FromEnd {
        /// Counted from the end as in Python (`1` = last layer).
        k: usize,
        /// Whether to apply `final_layer_norm`.
        final_norm: bool,
    },
}

impl HiddenLayer {
    /// SDXL's choice: `hidden_states[-2]` without the final norm.
    pub const PENULTIMATE: HiddenLayer = HiddenLayer::FromEnd {
        k: 2,
        final_norm: false,
    };
}

/// Outputs of a text encoder pass.
#[derive(Debug, Clone)]
pub struct ClipOutput {
    /// The requested hidden state `[B, L, hidden]`.
    pub hidden: Tensor,
    /// `final_layer_norm(last layer)` at each sequence's eos position `[B, hidden]`.
    pub pooled: Tensor,
    /// `text_projection(pooled)` `[B, projection_dim]`, for models with a projection.
    pub text_embeds: Option<Tensor>,
}

/// `self_attn` of one encoder layer.
#[derive(Debug, Clone)]
pub struct ClipAttention {
    /// Query projection.
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
    /// Output projection.
    pub out_proj: Linear,
    heads: usize,
}

impl ClipAttention {
    fn load(vb: &Vb, c: &ClipTextConfig) -> Result<Self> {
        let d = c.hidden_size;
        Ok(Self {
            q_proj: Linear::load(&vb.pp("q_proj"), d, d, true)?,
            k_proj: Linear::load(&vb.pp("k_proj"), d, d, true)?,
            v_proj: Linear::load(&vb.pp("v_proj"), d, d, true)?,
            out_proj: Linear::load(&vb.pp("out_proj"), d, d, true)?,
            heads: c.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let d = x.dim(2)?;
        let scale = ((d / self.heads) as f64).powf(-0.5);
        let q = split_heads(&self.q_proj.forward(x)?, self.heads)?;
        let k = split_heads(&self.k_proj.forward(x)?, self.heads)?;
        let v = split_heads(&self.v_proj.forward(x)?, self.heads)?;
        let a = attention(&q, &k, &v, Some(mask), scale)?;
        self.out_proj.forward(&merge_heads(&a, self.heads)?)
    }
}

impl Adaptable for ClipAttention {
    fn visit_adaptable(&mut self, p: &str, f: &mut dyn FnMut(&str, &mut dyn LoraHost)) {
        self.q_proj.visit_adaptable(&join_path(p, "q_proj"), f);
        self.k_proj.visit_adaptable(&join_path(p, "k_proj"), f);
        self.v_proj.visit_adaptable(&join_path(p, "v_proj"), f);
        self.out_proj.visit_adaptable(&join_path(p, "out_proj"), f);
    }
}

/// `mlp` of one encoder layer: `fc2(act(fc1(x)))`.
#[derive(Debug, Clone)]
pub struct ClipMlp {
    /// hidden -> intermediate.
    pub fc1: Linear,
    /// intermediate -> hidden.
    pub fc2: Linear,
    act: Activation,
}

impl ClipMlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.act.forward(&self.fc1.forward(x)?)?)
    }
}

impl Adaptable for ClipMlp {
    fn visit_adaptable(&mut self, p: &str, f: &mut dyn FnMut(&str, &mut dyn LoraHost)) {
        self.fc1.visit_adaptable(&join_path(p, "fc1"), f);
        self.fc2.visit_adaptable(&join_path(p, "fc2"), f);
    }
}

/// One pre-norm transformer layer (`encoder.layers.N`).
#[derive(Debug, Clone)]
pub struct ClipEncoderLayer {
    /// Causal self-attention.
    pub self_attn: ClipAttention,
    /// Norm before attention.
    pub layer_norm1: LayerNorm,
    /// Feed-forward.
    pub mlp: ClipMlp,
    /// Norm before the MLP.
    pub layer_norm2: LayerNorm,
}

impl ClipEncoderLayer {
    fn load(vb: &Vb, c: &ClipTextConfig) -> Result<Self> {
        let d = c.hidden_size;
        Ok(Self {
            self_attn: ClipAttention::load(&vb.pp("self_attn"), c)?,
            layer_norm1: LayerNorm::load(&vb.pp("layer_norm1"), d, c.layer_norm_eps)?,
            mlp: ClipMlp {
                fc1: Linear::load(&vb.pp("mlp").pp("fc1"), d, c.intermediate_size, true)?,
                fc2: Linear::load(&vb.pp("mlp").pp("fc2"), c.intermediate_size, d, true)?,
                act: c.activation()?,
            },
            layer_norm2: LayerNorm::load(&vb.pp("layer_norm2"), d, c.layer_norm_eps)?,
        })
    }

    /// `x + attn(ln1(x))`, then `+ mlp(ln2(.))`.
    pub fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = (x + self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, mask)?)?;
        Ok((&h + self.mlp.forward(&self.layer_norm2.forward(&h)?)?)?)
    }
}

impl Adaptable for ClipEncoderLayer {
    fn visit_adaptable(&mut self, p: &str, f: &mut dyn FnMut(&str, &mut dyn LoraHost)) {
        self.self_attn
            .visit_adaptable(&join_path(p, "self_attn"), f);
        self.mlp.visit_adaptable(&join_path(p, "mlp"), f);
    }
}

/// A CLIP text encoder, optionally with SDXL's `text_projection`.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    /// `text_model.embeddings.token_embedding`.
    pub token_embedding: Embedding,
    /// `text_model.embeddings.position_embedding`.
    pub position_embedding: Embedding,
    /// `text_model.encoder.layers`.
    pub layers: Vec<ClipEncoderLayer>,
    /// `text_model.final_layer_norm`.
    pub final_layer_norm: LayerNorm,
    /// `text_projection` (no bias), present in `CLIPTextModelWithProjection` checkpoints.
    pub text_projection: Option<Linear>,
    /// The configuration it was built from.
    pub config: ClipTextConfig,
}

impl ClipTextModel {
    /// Builds the encoder from `vb` rooted at the checkpoint. Keys are
    /// `text_model.{embeddings,encoder,final_layer_norm}.*` or, as recent
    /// transformers save `CLIPTextModel`, the same without `text_model.`;
    /// `text_projection.weight`, when present, makes this a
    /// `CLIPTextModelWithProjection`. LoRA paths are `text_model.*` either way.
    pub fn load(vb: &Vb, c: &ClipTextConfig) -> Result<Self> {
        c.validate()?;
        let tm = if vb.contains("text_model.embeddings.token_embedding.weight")
            || !vb.contains("embeddings.token_embedding.weight")
        {
            vb.pp("text_model")
        } else {
            vb.clone()
        };
        let emb = tm.pp("embeddings");
        let d = c.hidden_size;
        let token_embedding = Embedding::load(&emb.pp("token_embedding"), c.vocab_size, d)?;
        let position_embedding =
            Embedding::load(&emb.pp("position_embedding"), c.max_position_embeddings, d)?;
        // transformers registers `position_ids` as a buffer; older checkpoints store it.
        if emb.contains("position_ids") {
            emb.get_any_shape("position_ids")?;
        }
        let layers = (0..c.num_hidden_layers)
            .map(|i| ClipEncoderLayer::load(&tm.pp("encoder").pp("layers").pp(i), c))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::load(&tm.pp("final_layer_norm"), d, c.layer_norm_eps)?;
        let text_projection = if vb.contains("text_projection.weight") {
            let p = vb
                .shape_of("text_projection.weight")
                .map(|s| s[0])
                .unwrap_or(d);
            if let Some(pd) = c.projection_dim {
                if pd != p {
                    bail!(
                        "{}: text_projection has {p} outputs but config.json says projection_dim {pd}",
                        vb.source().origin("text_projection.weight")
                    );
                }
            }
            Some(Linear::load(&vb.pp("text_projection"), d, p, false)?)
        } else {
            None
        };
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            config: c.clone(),
        })
    }

    /// Loads `dir/config.json` and the weights in `dir` (a `text_encoder/` folder).
    pub fn from_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg = ClipTextConfig::from_file(&dir.join("config.json"))?;
        let vb = Vb::from_dir(dir, dtype, device)?;
        Self::load(&vb, &cfg)
            .with_context(|| format!("building the text encoder in {}", dir.display()))
    }

    /// Width of the hidden states.
    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// Dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.token_embedding.weight.dtype()
    }

    /// Token + position embeddings of `ids` `[B, L]` (`hidden_states[0]`).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (_, l) = ids.dims2()?;
        ensure!(
            l <= self.config.max_position_embeddings,
            "{l} tokens exceed the text encoder's {} positions",
            self.config.max_position_embeddings
        );
        let tok = self.token_embedding.forward(ids)?;
        let pos_ids = Tensor::arange(0u32, l as u32, ids.device())?;
        let pos = self.position_embedding.forward(&pos_ids)?;
        Ok(tok.broadcast_add(&pos)?)
    }

    /// Encodes `ids` `[B, L]` (u32), returning the requested hidden state,
    /// the pooled eos embedding and (with a projection) `text_embeds`.
    pub fn forward(&self, ids: &Tensor, layer: HiddenLayer) -> Result<ClipOutput> {
        let (b, l) = ids.dims2()?;
        let n = self.layers.len();
        let want = match layer {
            HiddenLayer::Last => n,
            HiddenLayer::FromEnd { k, .. } => {
                ensure!(
                    (1..=n + 1).contains(&k),
                    "hidden_states[-{k}] does not exist: the text encoder has {n} layers"
                );
                n + 1 - k
            }
        };
        let mut x = self.embed(ids)?;
        let mask = causal_mask(l, DType::F32, ids.device())?;
        let mut picked = if want == 0 { Some(x.clone()) } else { None };
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &mask)?;
            if i + 1 == want {
                picked = Some(x.clone());
            }
        }
        let last = self.final_layer_norm.forward(&x)?;
        let hidden = match layer {
            HiddenLayer::Last
            | HiddenLayer::FromEnd {
                k: 1,
                final_norm: true,
            } => last.clone(),
            HiddenLayer::FromEnd { final_norm, .. } => {
                let h = picked.expect("layer index checked above");
                if final_norm {
                    self.final_layer_norm.forward(&h)?
                } else {
                    h
                }
            }
        };
        let eos_pos = self.eos_positions(ids)?;
        let rows = (0..b)
            .map(|i| last.i((i, eos_pos[i])))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let pooled = Tensor::stack(&rows, 0)?;
        let text_embeds = match &self.text_projection {
            Some(p) => Some(p.forward(&pooled)?),
            None => None,
        };
        Ok(ClipOutput {
            hidden,
            pooled,
            text_embeds,
        })
    }

    /// Pooling position per sequence, as transformers: the first
    /// `eos_token_id`, or argmax of the ids for legacy configs (eos id 2) and
    /// for sequences without an eos.
    pub fn eos_positions(&self, ids: &Tensor) -> Result<Vec<usize>> {
        let rows = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let eos = self.config.eos_token_id;
        Ok(rows
            .iter()
            .map(|r| {
                let argmax = || {
                    r.iter()
                        .enumerate()
                        .fold(
                            (0usize, 0u32),
                            |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) },
                        )
                        .0
                };
                if eos == 2 {
                    argmax()
                } else {
                    r.iter().position(|&v| v == eos).unwrap_or_else(argmax)
                }
            })
            .collect())
    }
}

impl Adaptable for ClipTextModel {
    fn visit_adaptable(&mut self, p: &str, f: &mut dyn FnMut(&str, &mut dyn LoraHost)) {
        self.layers
            .visit_adaptable(&join_path(p, "text_model.encoder.layers"), f);
        self.text_projection
            .visit_adaptable(&join_path(p, "text_projection"), f);
    }
}
