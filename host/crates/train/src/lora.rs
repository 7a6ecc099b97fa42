//! Trainable LoRA adapters: one `(down, up)` pair of candle `Var`s per
//! targeted layer, attached to the model as runtime adapters that share the
//! variables' storage (so optimizer updates are seen by the next forward).
//! peft's `init_lora_weights="gaussian"`: down ~ N(0, (1/rank)^2), up = 0.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Result};
use candle_core::{DType, Device, Tensor, Var};
use selma_diffusion::nn::{Adaptable, Adapter, LayerKind};
use selma_lora::{LoraFile, LoraLayer};

use crate::rng::TrainRng;

/// SELMA's default targets: every attention projection of the UNet.
pub const DEFAULT_TARGETS: [&str; 4] = ["to_q", "to_k", "to_v", "to_out.0"];

/// Text-encoder targets when it trains with LoRA: CLIP's attention
/// projections (diffusers' and kohya's text-encoder LoRA modules).
pub const TEXT_ENCODER_TARGETS: [&str; 4] = ["q_proj", "k_proj", "v_proj", "out_proj"];

/// One adapted layer's trainable factors.
#[derive(Debug, Clone)]
pub struct LoraParam {
    /// Module path relative to the component, e.g. `mid_block.attentions.0.transformer_blocks.0.attn1.to_q`.
    pub path: String,
    /// `[rank, in]` (peft `lora_A`).
    pub down: Var,
    /// `[out, rank]` (peft `lora_B`).
    pub up: Var,
}

/// All trained adapters of one component.
#[derive(Debug, Clone)]
pub struct LoraSet {
    /// Component prefix in LoRA files (`unet`).
    pub component: String,
    /// Rank of every adapter.
    pub rank: usize,
    /// `alpha` (scale = alpha / rank).
    pub alpha: f64,
    /// Adapted layers in visiting order.
    pub layers: Vec<LoraParam>,
}

/// Runs `f` on `model` with every adapter taken off (the frozen base
/// model, as the reference of a preference objective), then puts them all
/// back in place. Nothing `f` computes depends on the adapters' variables.
pub fn with_adapters_off<M: Adaptable, R>(model: &mut M, f: impl FnOnce(&M) -> R) -> R {
    let mut taken: Vec<Vec<Adapter>> = vec![];
    model.visit_adaptable("", &mut |_, host| {
        taken.push(std::mem::take(host.adapters_mut()))
    });
    let r = f(model);
    let mut it = taken.into_iter();
    model.visit_adaptable("", &mut |_, host| {
        if let Some(a) = it.next() {
            *host.adapters_mut() = a;
        }
    });
    r
}

/// Whether module `path` is selected by `target` (the full path, or a suffix at a `.` boundary).
pub fn matches_target(path: &str, target: &str) -> bool {
    path == target || path.ends_with(&format!(".{target}"))
}

impl LoraSet {
    /// Creates and attaches adapters to every linear layer of `model` whose
    /// path matches one of `targets`; `dtype` is the master-weight dtype
    /// (f32 for training, f64 for gradient checks).
    #[allow(clippy::too_many_arguments)]
    pub fn attach(
        model: &mut dyn Adaptable,
        component: &str,
        targets: &[String],
        rank: usize,
        alpha: f64,
        rng: &mut TrainRng,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        ensure!(rank > 0, "--rank must be at least 1");
        let scale = (alpha / rank as f64) as f32;
        let mut layers = vec![];
        let mut err = None;
        model.visit_adaptable("", &mut |path, host| {
            if err.is_some() || !targets.iter().any(|t| matches_target(path, t)) {
                return;
            }
            let res = (|| -> Result<LoraParam> {
                let LayerKind::Linear { in_dim, out_dim } = host.kind() else {
                    bail!("target {path} is a convolution; only linear layers can be trained")
                };
                let down = Var::from_tensor(&rng.randn(
                    (rank, in_dim),
                    1.0 / rank as f64,
                    device,
                    dtype,
                )?)?;
                let up = Var::from_tensor(&Tensor::zeros((out_dim, rank), dtype, device)?)?;
                host.add_adapter(Adapter::new(
                    up.as_tensor().clone(),
                    down.as_tensor().clone(),
                    scale,
                    1.0,
                ))?;
                Ok(LoraParam {
                    path: path.to_string(),
                    down,
                    up,
                })
            })();
            match res {
                Ok(p) => layers.push(p),
                Err(e) => err = Some(e),
            }
        });
        if let Some(e) = err {
            return Err(e);
        }
        let flag = if component == "unet" {
            "--targets"
        } else {
            "--text-encoder-targets"
        };
        ensure!(
            !layers.is_empty(),
            "no layer of the {component} matches {flag} {}",
            targets.join(",")
        );
        Ok(Self {
            component: component.to_string(),
            rank,
            alpha,
            layers,
        })
    }

    /// The variables in a fixed order: `down, up` of each layer.
    pub fn vars(&self) -> Vec<Var> {
        self.layers
            .iter()
            .flat_map(|l| [l.down.clone(), l.up.clone()])
            .collect()
    }

    /// Names matching `vars()`: `<path>.lora_A` / `<path>.lora_B`.
    pub fn var_names(&self) -> Vec<String> {
        self.layers
            .iter()
            .flat_map(|l| [format!("{}.lora_A", l.path), format!("{}.lora_B", l.path)])
            .collect()
    }

    /// The adapters as a LoRA file (f32, `<component>.<path>` keys), with
    /// rank and alpha in the metadata. The tensors are copies: an f32 CPU
    /// variable's `to_dtype`/`to_device` share its storage, so without the
    /// copy a later write to the variable (the EMA swap putting the current
    /// weights back) would change a file not yet saved.
    pub fn to_lora_file(&self, extra: &BTreeMap<String, String>) -> Result<LoraFile> {
        let mut file = LoraFile::default();
        for l in &self.layers {
            let up =
                l.up.as_tensor()
                    .to_dtype(DType::F32)?
                    .to_device(&Device::Cpu)?
                    .copy()?;
            let down = l
                .down
                .as_tensor()
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?
                .copy()?;
            file.layers.insert(
                format!("{}.{}", self.component, l.path),
                LoraLayer::new(up, down, self.alpha as f32)?,
            );
        }
        file.metadata = extra.clone();
        file.metadata
            .insert("selma_rank".into(), self.rank.to_string());
        file.metadata
            .insert("selma_alpha".into(), self.alpha.to_string());
        Ok(file)
    }
}
