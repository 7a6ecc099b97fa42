//! LoRA adapters on layers: `Adapter` (one low-rank update), `LoraHost` (a
//! layer that can carry adapters: `Linear`, `Conv2d`) and `Adaptable` (a model
//! that exposes every such layer under its diffusers module path).

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};

/// One low-rank update `delta W = up · down · scale · weight`.
/// Linear: `down` `[r, in]`, `up` `[out, r]`. Conv2d (kohya LoCon): `down`
/// `[r, in, kh, kw]`, `up` `[out, r, 1, 1]`. Use tensors of a candle `Var` to train them.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// `[out, r]` (conv: `[out, r, 1, 1]`).
    pub up: Tensor,
    /// `[r, in]` (conv: `[r, in, kh, kw]`).
    pub down: Tensor,
    /// `alpha / rank`.
    pub scale: f32,
    /// The user's per-adapter multiplier (`--lora FILE:WEIGHT`).
    pub weight: f32,
}

impl Adapter {
    /// Builds an adapter.
    pub fn new(up: Tensor, down: Tensor, scale: f32, weight: f32) -> Self {
        Self {
            up,
            down,
            scale,
            weight,
        }
    }

    /// The adapter's rank.
    pub fn rank(&self) -> usize {
        self.down.dims()[0]
    }

    /// `scale * weight` as f64.
    pub fn factor(&self) -> f64 {
        self.scale as f64 * self.weight as f64
    }

    /// The dense update `up · down · scale · weight` as an f32 `[out, in*kh*kw]` matrix.
    pub fn delta(&self) -> Result<Tensor> {
        let r = self.rank();
        let out = self.up.dims()[0];
        let up = self.up.to_dtype(DType::F32)?.reshape((out, r))?;
        let down = self.down.to_dtype(DType::F32)?;
        let inn = down.elem_count() / r;
        let down = down.reshape((r, inn))?;
        Ok((up.matmul(&down)? * self.factor())?)
    }
}

/// The geometry of an adaptable layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// `weight` `[out, in]`.
    Linear { in_dim: usize, out_dim: usize },
    /// `weight` `[out, in, kh, kw]`.
    Conv2d {
        in_ch: usize,
        out_ch: usize,
        kh: usize,
        kw: usize,
    },
}

/// A layer that can carry LoRA adapters.
pub trait LoraHost {
    /// Geometry of the layer's weight.
    fn kind(&self) -> LayerKind;
    /// The base weight.
    fn base_weight(&self) -> &Tensor;
    /// The adapters applied at runtime, in order.
    fn adapters(&self) -> &[Adapter];
    /// Mutable access to the adapters (to replace or clear them).
    fn adapters_mut(&mut self) -> &mut Vec<Adapter>;
    /// Replaces the base weight (same shape); used by merges.
    fn set_base_weight(&mut self, w: Tensor) -> Result<()>;

    /// Adds an adapter after reshaping its factors to this layer's geometry
    /// (2-D factors on a 1x1 conv, 4-D 1x1 factors on a linear); errors on
    /// shape mismatch.
    fn add_adapter(&mut self, a: Adapter) -> Result<()> {
        let a = fit_adapter(self.kind(), a)?;
        self.adapters_mut().push(a);
        Ok(())
    }

    /// Folds every runtime adapter into the base weight and removes them.
    fn merge_adapters(&mut self) -> Result<()> {
        if self.adapters().is_empty() {
            return Ok(());
        }
        let w = self.base_weight().clone();
        let dtype = w.dtype();
        let mut acc = w.to_dtype(DType::F32)?;
        for a in self.adapters() {
            acc = (acc + a.delta()?.reshape(w.dims())?)?;
        }
        let merged = acc.to_dtype(dtype)?;
        self.set_base_weight(merged)?;
        self.adapters_mut().clear();
        Ok(())
    }
}

/// Reshapes an adapter's factors to fit `kind`, checking the dimensions.
pub fn fit_adapter(kind: LayerKind, a: Adapter) -> Result<Adapter> {
    let r = a.down.dims().first().copied().unwrap_or(0);
    ensure!(r > 0, "adapter has an empty down matrix");
    ensure!(
        a.up.dims().len() >= 2 && a.up.dims()[1] == r && a.up.dims()[2..].iter().all(|&d| d == 1),
        "adapter up {:?} does not match down {:?} (rank {r})",
        a.up.dims(),
        a.down.dims()
    );
    match kind {
        LayerKind::Linear { in_dim, out_dim } => {
            ensure!(
                a.down.elem_count() == r * in_dim && a.up.dims()[0] == out_dim,
                "adapter (down {:?}, up {:?}) does not fit a linear layer [{out_dim}, {in_dim}]",
                a.down.dims(),
                a.up.dims()
            );
            Ok(Adapter {
                up: a.up.reshape((out_dim, r))?,
                down: a.down.reshape((r, in_dim))?,
                ..a
            })
        }
        LayerKind::Conv2d {
            in_ch,
            out_ch,
            kh,
            kw,
        } => {
            let down = if a.down.dims().len() == 4 {
                a.down.clone()
            } else {
                a.down.reshape((r, in_ch, kh, kw))?
            };
            ensure!(
                down.dims() == [r, in_ch, kh, kw] && a.up.dims()[0] == out_ch,
                "adapter (down {:?}, up {:?}) does not fit a conv [{out_ch}, {in_ch}, {kh}, {kw}]",
                a.down.dims(),
                a.up.dims()
            );
            Ok(Adapter {
                up: a.up.reshape((out_ch, r, 1, 1))?,
                down,
                ..a
            })
        }
    }
}

/// Joins module path components with `.` (an empty prefix adds nothing).
pub fn join_path(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else if name.is_empty() {
        prefix.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// A model (or part) exposing each LoRA-capable layer under its diffusers
/// module path, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`.
pub trait Adaptable {
    /// Calls `f(path, layer)` for every adaptable layer below `prefix`.
    fn visit_adaptable(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut dyn LoraHost));
}

impl<T: Adaptable> Adaptable for Vec<T> {
    fn visit_adaptable(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut dyn LoraHost)) {
        for (i, m) in self.iter_mut().enumerate() {
            m.visit_adaptable(&join_path(prefix, &i.to_string()), f);
        }
    }
}

impl<T: Adaptable> Adaptable for Option<T> {
    fn visit_adaptable(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut dyn LoraHost)) {
        if let Some(m) = self {
            m.visit_adaptable(prefix, f);
        }
    }
}

/// Every adaptable layer path of `model` (handy for tests and trainers).
pub fn adaptable_paths(model: &mut dyn Adaptable) -> Vec<String> {
    let mut out = vec![];
    model.visit_adaptable("", &mut |p, _| out.push(p.to_string()));
    out
}

/// Merges every runtime adapter of `model` into its base weights.
pub fn merge_all_adapters(model: &mut dyn Adaptable) -> Result<()> {
    let mut err = None;
    model.visit_adaptable("", &mut |p, l| {
        if err.is_none() {
            if let Err(e) = l.merge_adapters() {
                err = Some(e.context(format!("merging adapters into {p}")));
            }
        }
    });
    err.map_or(Ok(()), Err)
}

/// Removes every runtime adapter from `model`.
pub fn clear_all_adapters(model: &mut dyn Adaptable) {
    model.visit_adaptable("", &mut |_, l| l.adapters_mut().clear());
}
