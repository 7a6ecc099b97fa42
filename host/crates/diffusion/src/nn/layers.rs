//! `Linear`, `Conv2d` (both LoRA hosts), `GroupNorm`, `LayerNorm`, `Embedding`.
//! A weight that tracks gradients (a candle `Var` in full fine-tuning, see
//! `Vb::new_trainable`) takes the plain differentiable op; a frozen one takes
//! the frozen op, whose backward computes no weight (or bias) gradient; with
//! gradients flowing through frozen norms, the fused frozen group/layer norm.

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Tensor, D};

use super::activation::silu;
use super::adapter::{fit_adapter, Adaptable, Adapter, LayerKind, LoraHost};
use super::conv_gemm::conv2d_gemm;
use super::frozen::{frozen_conv2d_bias, frozen_linear};
use super::frozen::{group_norm_frozen, layer_norm_frozen};
use crate::weights::Vb;

fn upcast(x: &Tensor) -> Result<Tensor> {
    Ok(match x.dtype() {
        DType::F16 | DType::BF16 => x.to_dtype(DType::F32)?,
        _ => x.clone(),
    })
}

fn match_dtype(t: &Tensor, dtype: DType) -> Result<Tensor> {
    Ok(if t.dtype() == dtype {
        t.clone()
    } else {
        t.to_dtype(dtype)?
    })
}

/// `y = x Wᵀ + b + Σ x downᵀ upᵀ · scale · weight` over the last dimension.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Tensor,
    /// `[out]`.
    pub bias: Option<Tensor>,
    /// Runtime LoRA adapters.
    pub adapters: Vec<Adapter>,
}

impl Linear {
    /// Loads `weight` `[out, in]` (and `bias` `[out]`) from `vb`.
    pub fn load(vb: &Vb, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self::new(weight, bias))
    }

    /// Wraps existing tensors.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            adapters: vec![],
        }
    }

    /// `(in, out)`.
    pub fn dims(&self) -> (usize, usize) {
        let d = self.weight.dims();
        (d[1], d[0])
    }

    /// Applies the layer to `[..., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (in_dim, out_dim) = self.dims();
        let dims = x.dims().to_vec();
        ensure!(
            dims.last() == Some(&in_dim),
            "linear layer expects last dim {in_dim}, got input {dims:?}"
        );
        let n = x.elem_count() / in_dim;
        let x2 = x.reshape((n, in_dim))?;
        let w = match_dtype(&self.weight, x.dtype())?;
        let b = self
            .bias
            .as_ref()
            .map(|b| match_dtype(b, x.dtype()))
            .transpose()?;
        let mut y = if w.track_op() {
            let y = x2.matmul(&w.t()?)?;
            match &b {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            }
        } else {
            frozen_linear(&x2, &w, b.as_ref())?
        };
        for a in &self.adapters {
            let down = match_dtype(&a.down, x.dtype())?;
            let up = match_dtype(&a.up, x.dtype())?;
            let h = x2.matmul(&down.t()?)?.matmul(&up.t()?)?;
            y = (y + (h * a.factor())?)?;
        }
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = out_dim;
        Ok(y.reshape(out_dims)?)
    }
}

impl LoraHost for Linear {
    fn kind(&self) -> LayerKind {
        let (in_dim, out_dim) = self.dims();
        LayerKind::Linear { in_dim, out_dim }
    }
    fn base_weight(&self) -> &Tensor {
        &self.weight
    }
    fn adapters(&self) -> &[Adapter] {
        &self.adapters
    }
    fn adapters_mut(&mut self) -> &mut Vec<Adapter> {
        &mut self.adapters
    }
    fn set_base_weight(&mut self, w: Tensor) -> Result<()> {
        ensure!(
            w.dims() == self.weight.dims(),
            "new weight {:?} != {:?}",
            w.dims(),
            self.weight.dims()
        );
        self.weight = w;
        Ok(())
    }
}

impl Adaptable for Linear {
    fn visit_adaptable(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut dyn LoraHost)) {
        f(prefix, self)
    }
}

/// 2-D convolution (square kernel, symmetric padding, groups 1), with
/// kohya LoCon adapters: `conv(x, down; stride, pad)` then a 1x1 `up`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    /// `[out, in, k, k]`.
    pub weight: Tensor,
    /// `[out]`.
    pub bias: Option<Tensor>,
    /// Stride.
    pub stride: usize,
    /// Padding (both sides, both axes).
    pub padding: usize,
    /// Runtime LoRA adapters.
    pub adapters: Vec<Adapter>,
}

impl Conv2d {
    /// Loads `weight` `[out, in, k, k]` (and `bias`).
    pub fn load(
        vb: &Vb,
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = vb.get((out_ch, in_ch, kernel, kernel), "weight")?;
        let bias = if bias {
            Some(vb.get(out_ch, "bias")?)
        } else {
            None
        };
        Ok(Self::new(weight, bias, stride, padding))
    }

    /// Wraps existing tensors.
    pub fn new(weight: Tensor, bias: Option<Tensor>, stride: usize, padding: usize) -> Self {
        Self {
            weight,
            bias,
            stride,
            padding,
            adapters: vec![],
        }
    }

    /// Applies the convolution to `[B, in, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        let w = match_dtype(&self.weight, dt)?;
        let b = self.bias.as_ref().map(|b| match_dtype(b, dt)).transpose()?;
        let y = if w.track_op() {
            conv2d_gemm(x, &w, self.padding, self.stride).and_then(|y| match &b {
                Some(b) => Ok(y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?)?),
                None => Ok(y),
            })
        } else {
            frozen_conv2d_bias(x, &w, b.as_ref(), self.padding, self.stride)
        };
        let mut y = y.with_context(|| {
            format!(
                "conv2d with weight {:?} on input {:?}",
                self.weight.dims(),
                x.dims()
            )
        })?;
        for a in &self.adapters {
            let h = conv2d_gemm(x, &match_dtype(&a.down, dt)?, self.padding, self.stride)?;
            let h = conv2d_gemm(&h, &match_dtype(&a.up, dt)?, 0, 1)?;
            y = (y + (h * a.factor())?)?;
        }
        Ok(y)
    }
}

impl LoraHost for Conv2d {
    fn kind(&self) -> LayerKind {
        let d = self.weight.dims();
        LayerKind::Conv2d {
            out_ch: d[0],
            in_ch: d[1],
            kh: d[2],
            kw: d[3],
        }
    }
    fn base_weight(&self) -> &Tensor {
        &self.weight
    }
    fn adapters(&self) -> &[Adapter] {
        &self.adapters
    }
    fn adapters_mut(&mut self) -> &mut Vec<Adapter> {
        &mut self.adapters
    }
    fn set_base_weight(&mut self, w: Tensor) -> Result<()> {
        ensure!(
            w.dims() == self.weight.dims(),
            "new weight {:?} != {:?}",
            w.dims(),
            self.weight.dims()
        );
        self.weight = w;
        Ok(())
    }
    fn add_adapter(&mut self, a: Adapter) -> Result<()> {
        let a = fit_adapter(self.kind(), a)?;
        self.adapters.push(a);
        Ok(())
    }
}

impl Adaptable for Conv2d {
    fn visit_adaptable(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut dyn LoraHost)) {
        f(prefix, self)
    }
}

/// Group normalisation over `[B, C, ...]` (composite ops, f32 statistics).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    /// `[C]`.
    pub weight: Tensor,
    /// `[C]`.
    pub bias: Tensor,
    /// Number of groups.
    pub num_groups: usize,
    /// Epsilon added to the variance.
    pub eps: f64,
}

impl GroupNorm {
    /// Loads `weight` and `bias` `[channels]`.
    pub fn load(vb: &Vb, num_groups: usize, channels: usize, eps: f64) -> Result<Self> {
        ensure!(
            channels.is_multiple_of(num_groups),
            "{}: {channels} channels not divisible into {num_groups} groups",
            vb.prefix()
        );
        Ok(Self {
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
            num_groups,
            eps,
        })
    }

    /// Normalises `[B, C, ...]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        ensure!(dims.len() >= 3, "GroupNorm needs rank >= 3, got {dims:?}");
        if let Some(y) = group_norm_frozen(
            x,
            self.num_groups,
            &self.weight,
            &self.bias,
            self.eps,
            false,
        )? {
            return Ok(y);
        }
        let (b, c) = (dims[0], dims[1]);
        let per_group = x.elem_count() / (b * self.num_groups);
        let xs = upcast(&x.reshape((b, self.num_groups, per_group))?)?;
        let mean = xs.mean_keepdim(2)?;
        let xc = xs.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(2)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let mut wd = vec![1usize; dims.len()];
        wd[1] = c;
        let w = upcast(&self.weight)?.reshape(wd.as_slice())?;
        let bb = upcast(&self.bias)?.reshape(wd.as_slice())?;
        let y = xn
            .reshape(dims.as_slice())?
            .broadcast_mul(&w)?
            .broadcast_add(&bb)?;
        Ok(y.to_dtype(x.dtype())?)
    }

    /// `silu(norm(x))`: one fused node when gradients flow through a frozen
    /// norm on the CPU (see `frozen::group_norm_frozen`), else
    /// [`GroupNorm::forward`] followed by SiLU.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        match group_norm_frozen(x, self.num_groups, &self.weight, &self.bias, self.eps, true)? {
            Some(y) => Ok(y),
            None => silu(&self.forward(x)?),
        }
    }
}

/// Layer normalisation over the last dimension (composite ops when gradients
/// are tracked; candle's fused kernel otherwise).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// `[D]`.
    pub weight: Tensor,
    /// `[D]` (None for bias-free norms).
    pub bias: Option<Tensor>,
    /// Epsilon added to the variance.
    pub eps: f64,
}

impl LayerNorm {
    /// Loads `weight` and `bias` `[dim]`.
    pub fn load(vb: &Vb, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: Some(vb.get(dim, "bias")?),
            eps,
        })
    }

    /// Normalises over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let tracked = x.track_op()
            || self.weight.track_op()
            || self.bias.as_ref().is_some_and(|b| b.track_op());
        if !tracked && x.is_contiguous() {
            if let Some(b) = &self.bias {
                let w = match_dtype(&self.weight, x.dtype())?;
                let b = match_dtype(b, x.dtype())?;
                if w.is_contiguous() && b.is_contiguous() {
                    return Ok(candle_nn::ops::layer_norm(x, &w, &b, self.eps as f32)?);
                }
            }
        }
        if let Some(b) = &self.bias {
            if let Some(y) = layer_norm_frozen(x, &self.weight, b, self.eps)? {
                return Ok(y);
            }
        }
        let xs = upcast(x)?;
        let mean = xs.mean_keepdim(D::Minus1)?;
        let xc = xs.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let mut y = xn.broadcast_mul(&upcast(&self.weight)?)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&upcast(b)?)?;
        }
        Ok(y.to_dtype(x.dtype())?)
    }
}

/// Row lookup `weight[ids]` (differentiable w.r.t. `weight`).
#[derive(Debug, Clone)]
pub struct Embedding {
    /// `[num, dim]`.
    pub weight: Tensor,
}

impl Embedding {
    /// Loads `weight` `[num, dim]`.
    pub fn load(vb: &Vb, num: usize, dim: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get((num, dim), "weight")?,
        })
    }

    /// Looks up ids of any shape `[...]` -> `[..., dim]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let dim = self.weight.dims()[1];
        let mut out_dims = ids.dims().to_vec();
        out_dims.push(dim);
        let flat = ids.flatten_all()?;
        // index_select needs a contiguous table (broadcast test weights are not).
        let w = if self.weight.is_contiguous() {
            self.weight.clone()
        } else {
            self.weight.contiguous()?
        };
        Ok(w.index_select(&flat, 0)?.reshape(out_dims)?)
    }
}
