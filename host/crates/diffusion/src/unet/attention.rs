//! The UNet's attention path, named like diffusers' checkpoint keys:
//! `Transformer2DModel` (`norm`, `proj_in`, `transformer_blocks.K`, `proj_out`),
//! `BasicTransformerBlock` (`norm1`, `attn1`, `norm2`, `attn2`, `norm3`, `ff`),
//! `Attention` (`to_q`, `to_k`, `to_v`, `to_out.0`) and the GEGLU `FeedForward`
//! (`ff.net.0.proj`, `ff.net.2`). Every op is differentiable (composite
//! softmax/LayerNorm/GroupNorm from `crate::nn`).

use anyhow::Result;
use candle_core::{DType, Tensor, D};

use crate::nn::{
    attention, geglu_erf, join_path, merge_heads, split_heads, Activation, Adaptable, Conv2d,
    GroupNorm, LayerNorm, Linear, LoraHost,
};
use crate::weights::Vb;

/// diffusers' `Attention` as used by the UNet: no q/k/v bias, biased output.
#[derive(Debug)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
    upcast: bool,
}

impl Attention {
    /// Loads `to_q`, `to_k`, `to_v`, `to_out.0` under `vb`; `context_dim` is the
    /// key/value input width (None: self-attention).
    pub fn load(
        vb: &Vb,
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        dim_head: usize,
        upcast: bool,
    ) -> Result<Self> {
        let inner = heads * dim_head;
        let ctx = context_dim.unwrap_or(query_dim);
        Ok(Self {
            to_q: Linear::load(&vb.pp("to_q"), query_dim, inner, false)?,
            to_k: Linear::load(&vb.pp("to_k"), ctx, inner, false)?,
            to_v: Linear::load(&vb.pp("to_v"), ctx, inner, false)?,
            to_out: Linear::load(&vb.pp("to_out").pp(0), inner, query_dim, true)?,
            heads,
            scale: 1.0 / (dim_head as f64).sqrt(),
            upcast,
        })
    }

    /// `[B, N, query_dim]` (+ context `[B, M, context_dim]`) -> `[B, N, query_dim]`.
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let ctx = context.unwrap_or(xs);
        let q = split_heads(&self.to_q.forward(xs)?, self.heads)?;
        let k = split_heads(&self.to_k.forward(ctx)?, self.heads)?;
        let v = split_heads(&self.to_v.forward(ctx)?, self.heads)?;
        let dtype = q.dtype();
        let out = if self.upcast && dtype != DType::F32 {
            // diffusers' `upcast_attention`: q·kᵀ and softmax in f32.
            let (q, k, v) = (
                q.to_dtype(DType::F32)?,
                k.to_dtype(DType::F32)?,
                v.to_dtype(DType::F32)?,
            );
            attention(&q, &k, &v, None, self.scale)?.to_dtype(dtype)?
        } else {
            attention(&q, &k, &v, None, self.scale)?
        };
        self.to_out.forward(&merge_heads(&out, self.heads)?)
    }
}

impl Adaptable for Attention {
    fn visit_adaptable(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut dyn LoraHost)) {
        self.to_q.visit_adaptable(&join_path(prefix, "to_q"), f);
        self.to_k.visit_adaptable(&join_path(prefix, "to_k"), f);
        self.to_v.visit_adaptable(&join_path(prefix, "to_v"), f);
        self.to_out
            .visit_adaptable(&join_path(prefix, "to_out.0"), f);
    }
}

/// diffusers' `FeedForward` with `activation_fn="geglu"`:
/// `net.2(h * gelu(gate))` where `(h, gate) = net.0.proj(x).chunk(2)`.
#[derive(Debug)]
pub struct FeedForward {
    proj: Linear,
    out: Linear,
    act: Activation,
}

impl FeedForward {
    /// Loads `net.0.proj` (`dim -> 2*4*dim`) and `net.2` (`4*dim -> dim`) under `vb`.
    pub fn load(vb: &Vb, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        let net = &vb.pp("net");
        Ok(Self {
            proj: Linear::load(&net.pp(0).pp("proj"), dim, inner * 2, true)?,
            out: Linear::load(&net.pp(2), inner, dim, true)?,
            act: Activation::GeluErf,
        })
    }

    /// Applies the feed-forward to `[B, N, dim]`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.proj.forward(xs)?;
        if self.act == Activation::GeluErf {
            return self.out.forward(&geglu_erf(&h)?);
        }
        let inner = h.dim(D::Minus1)? / 2;
        let gate = self.act.forward(&h.narrow(D::Minus1, inner, inner)?)?;
        let h = (h.narrow(D::Minus1, 0, inner)? * gate)?;
        self.out.forward(&h)
    }
}

impl Adaptable for FeedForward {
    fn visit_adaptable(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut dyn LoraHost)) {
        self.proj
            .visit_adaptable(&join_path(prefix, "net.0.proj"), f);
        self.out.visit_adaptable(&join_path(prefix, "net.2"), f);
    }
}

/// diffusers' `BasicTransformerBlock` (layer-norm variant, self-attn, cross-attn, GEGLU).
#[derive(Debug)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    /// Loads one block of width `dim` under `vb`.
    pub fn load(
        vb: &Vb,
        dim: usize,
        heads: usize,
        dim_head: usize,
        cross_attention_dim: usize,
        upcast: bool,
    ) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::load(&vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::load(&vb.pp("attn1"), dim, None, heads, dim_head, upcast)?,
            norm2: LayerNorm::load(&vb.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::load(
                &vb.pp("attn2"),
                dim,
                Some(cross_attention_dim),
                heads,
                dim_head,
                upcast,
            )?,
            norm3: LayerNorm::load(&vb.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::load(&vb.pp("ff"), dim)?,
        })
    }

    /// `[B, N, dim]` with context `[B, M, cross_attention_dim]`.
    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let xs = (self.attn1.forward(&self.norm1.forward(xs)?, None)? + xs)?;
        let xs = (self
            .attn2
            .forward(&self.norm2.forward(&xs)?, Some(context))?
            + xs)?;
        Ok((self.ff.forward(&self.norm3.forward(&xs)?)? + xs)?)
    }
}

impl Adaptable for BasicTransformerBlock {
    fn visit_adaptable(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut dyn LoraHost)) {
        self.attn1.visit_adaptable(&join_path(prefix, "attn1"), f);
        self.attn2.visit_adaptable(&join_path(prefix, "attn2"), f);
        self.ff.visit_adaptable(&join_path(prefix, "ff"), f);
    }
}

/// `proj_in` / `proj_out`: a 1x1 conv (SD 1.x) or a linear layer (SD 2.x, SDXL).
#[derive(Debug)]
enum Proj {
    Conv(Conv2d),
    Linear(Linear),
}

impl Proj {
    fn load(vb: &Vb, cin: usize, cout: usize, linear: bool) -> Result<Self> {
        Ok(if linear {
            Proj::Linear(Linear::load(vb, cin, cout, true)?)
        } else {
            Proj::Conv(Conv2d::load(vb, cin, cout, 1, 1, 0, true)?)
        })
    }

    fn visit(&mut self, path: &str, f: &mut dyn FnMut(&str, &mut dyn LoraHost)) {
        match self {
            Proj::Conv(c) => c.visit_adaptable(path, f),
            Proj::Linear(l) => l.visit_adaptable(path, f),
        }
    }
}

/// diffusers' `Transformer2DModel` (continuous input): GroupNorm (eps 1e-6),
/// `proj_in`, transformer blocks over the `h*w` tokens, `proj_out`, residual.
#[derive(Debug)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Proj,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Proj,
}

/// Shape parameters of one `Transformer2DModel`.
#[derive(Debug, Clone, Copy)]
pub struct TransformerSpec {
    /// Channels in and out (= heads * head dim in the UNet).
    pub channels: usize,
    /// Attention heads.
    pub heads: usize,
    /// Number of `BasicTransformerBlock`s.
    pub depth: usize,
    /// Width of the text context.
    pub cross_attention_dim: usize,
    /// GroupNorm groups.
    pub groups: usize,
    /// Linear instead of 1x1-conv projections.
    pub linear_projection: bool,
    /// Upcast attention scores to f32.
    pub upcast: bool,
}

impl Transformer2DModel {
    /// Loads the transformer under `vb` (e.g. `down_blocks.0.attentions.1`).
    pub fn load(vb: &Vb, spec: TransformerSpec) -> Result<Self> {
        let c = spec.channels;
        let dim_head = c / spec.heads;
        let tb = &vb.pp("transformer_blocks");
        let transformer_blocks = (0..spec.depth)
            .map(|i| {
                BasicTransformerBlock::load(
                    &tb.pp(i),
                    c,
                    spec.heads,
                    dim_head,
                    spec.cross_attention_dim,
                    spec.upcast,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::load(&vb.pp("norm"), spec.groups, c, 1e-6)?,
            proj_in: Proj::load(&vb.pp("proj_in"), c, c, spec.linear_projection)?,
            transformer_blocks,
            proj_out: Proj::load(&vb.pp("proj_out"), c, c, spec.linear_projection)?,
        })
    }

    /// `[B, C, H, W]` with context `[B, M, cross_attention_dim]` -> `[B, C, H, W]`.
    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let residual = xs;
        let xs = self.norm.forward(xs)?;
        let tokens = |t: &Tensor| -> Result<Tensor> {
            let ch = t.dim(1)?;
            Ok(t.permute((0, 2, 3, 1))?.reshape((b, h * w, ch))?)
        };
        let mut xs = match &self.proj_in {
            Proj::Conv(p) => tokens(&p.forward(&xs)?)?,
            Proj::Linear(p) => p.forward(&tokens(&xs)?)?,
        };
        for block in &self.transformer_blocks {
            xs = block.forward(&xs, context)?;
        }
        let image = |t: &Tensor| -> Result<Tensor> {
            let ch = t.dim(2)?;
            Ok(t.reshape((b, h, w, ch))?.permute((0, 3, 1, 2))?)
        };
        let xs = match &self.proj_out {
            Proj::Linear(p) => image(&p.forward(&xs)?)?,
            Proj::Conv(p) => p.forward(&image(&xs)?.contiguous()?)?,
        };
        debug_assert_eq!(xs.dim(1)?, c);
        Ok((xs + residual)?)
    }

    /// Switches the GEGLU activation (diffusers uses erf GELU; tests comparing
    /// against candle-transformers, which uses tanh GELU, switch to `GeluTanh`).
    pub fn set_geglu_activation(&mut self, act: Activation) {
        for b in &mut self.transformer_blocks {
            b.ff.act = act;
        }
    }
}

impl Adaptable for Transformer2DModel {
    fn visit_adaptable(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut dyn LoraHost)) {
        self.proj_in.visit(&join_path(prefix, "proj_in"), f);
        for (i, b) in self.transformer_blocks.iter_mut().enumerate() {
            b.visit_adaptable(&join_path(prefix, &format!("transformer_blocks.{i}")), f);
        }
        self.proj_out.visit(&join_path(prefix, "proj_out"), f);
    }
}
