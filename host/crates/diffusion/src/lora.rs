//! Attaching LoRA files (`selma_lora::LoraFile`, peft or kohya, LoCon convs
//! included) to the adaptable layers of our models, matched by diffusers
//! module path under a component prefix (`unet`, `text_encoder`,
//! `text_encoder_2`).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Context, Result};
use selma_lora::LoraFile;

use crate::nn::{Adaptable, Adapter};

/// Adds `adapters` (module path -> adapter, paths relative to `model`) to the
/// matching layers; returns the number of layers adapted. All paths are
/// checked first: if any matches no layer, the error lists them and nothing
/// is attached. A shape mismatch found while attaching leaves the layers
/// visited before it adapted, so discard the model on error.
pub fn attach_adapters(
    model: &mut dyn Adaptable,
    adapters: BTreeMap<String, Adapter>,
) -> Result<usize> {
    let mut known = BTreeSet::new();
    model.visit_adaptable("", &mut |p, _| {
        known.insert(p.to_string());
    });
    let unmatched: Vec<&String> = adapters.keys().filter(|k| !known.contains(*k)).collect();
    if !unmatched.is_empty() {
        let mut list = unmatched
            .iter()
            .take(10)
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        if unmatched.len() > 10 {
            list.push_str(&format!(", ... ({} in all)", unmatched.len()));
        }
        bail!(
            "{} LoRA module(s) match no layer of the model: {list}; was the LoRA trained for another model family?",
            unmatched.len()
        );
    }
    let mut adapters = adapters;
    let mut count = 0;
    let mut err = None;
    model.visit_adaptable("", &mut |p, layer| {
        if err.is_some() {
            return;
        }
        if let Some(a) = adapters.remove(p) {
            match layer.add_adapter(a) {
                Ok(()) => count += 1,
                Err(e) => err = Some(e.context(format!("attaching LoRA to layer {p}"))),
            }
        }
    });
    if let Some(e) = err {
        return Err(e);
    }
    Ok(count)
}

/// Attaches the layers of `file` under `component` (`unet`, `text_encoder`,
/// `text_encoder_2`) to `model`, each with the user weight `weight`. A file
/// without any layer for this component attaches nothing (returns 0); a
/// layer path that matches no layer of the model is an error naming it.
pub fn attach_lora(
    model: &mut dyn Adaptable,
    file: &LoraFile,
    component: &str,
    weight: f32,
) -> Result<usize> {
    let prefix = format!("{component}.");
    let mut adapters = BTreeMap::new();
    for (path, layer) in &file.layers {
        let Some(rest) = path.strip_prefix(&prefix) else {
            continue;
        };
        adapters.insert(
            rest.to_string(),
            Adapter::new(layer.up.clone(), layer.down.clone(), layer.scale(), weight),
        );
    }
    attach_adapters(model, adapters).with_context(|| format!("attaching LoRA to {component}"))
}

/// Number of layers of `file` that belong to `component`.
pub fn component_layer_count(file: &LoraFile, component: &str) -> usize {
    let prefix = format!("{component}.");
    file.layers
        .keys()
        .filter(|k| k.starts_with(&prefix))
        .count()
}
