//! Module naming: maps the key layouts of LoRA files (peft/diffusers, old
//! diffusers, kohya) to one canonical module path, `<component>.<diffusers
//! module path>` (e.g. `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`),
//! and back.
//!
//! Kohya flattens module paths with `_`, which is ambiguous because diffusers
//! names contain `_` themselves (`down_blocks`, `to_out`). We undo it with a
//! greedy longest-match tokenizer over the known diffusers / transformers
//! module-name vocabulary: every piece is either a vocabulary word or an index.
//! Kohya's SDXL files name UNet blocks as the original (SGM) model does
//! (`input_blocks.4.1...`); [`sgm_to_diffusers`] maps those to diffusers paths.

use anyhow::{bail, Result};

/// Components a LoRA file can adapt, by their diffusers folder names.
pub const COMPONENTS: [&str; 3] = ["unet", "text_encoder", "text_encoder_2"];

/// Module-name segments used by diffusers' UNet/VAE and transformers' CLIP
/// text encoders (every non-index segment of the SD 1.5 / 2.1 / XL key sets),
/// plus a few common extras.
pub const MODULE_VOCAB: &[&str] = &[
    // UNet structure
    "down_blocks",
    "up_blocks",
    "mid_block",
    "attentions",
    "resnets",
    "transformer_blocks",
    "downsamplers",
    "upsamplers",
    "time_embedding",
    "add_embedding",
    "linear_1",
    "linear_2",
    "conv_in",
    "conv_out",
    "conv_norm_out",
    "conv_shortcut",
    "time_emb_proj",
    "conv",
    "conv1",
    "conv2",
    "norm",
    "norm1",
    "norm2",
    "norm3",
    "proj_in",
    "proj_out",
    "proj",
    "attn1",
    "attn2",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "ff",
    "net",
    // VAE
    "encoder",
    "decoder",
    "quant_conv",
    "post_quant_conv",
    "group_norm",
    "query",
    "key",
    "value",
    "proj_attn",
    // CLIP text encoders (transformers)
    "text_model",
    "embeddings",
    "token_embedding",
    "position_embedding",
    "layers",
    "self_attn",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "layer_norm1",
    "layer_norm2",
    "mlp",
    "fc1",
    "fc2",
    "final_layer_norm",
    "text_projection",
    // original (SGM / kohya SDXL) UNet names, mapped by `sgm_to_diffusers`
    "input_blocks",
    "middle_block",
    "output_blocks",
    "in_layers",
    "emb_layers",
    "out_layers",
    "skip_connection",
    "op",
];

/// Which tensor of a layer a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The down projection (`lora_A`, `lora_down`), [r, in].
    Down,
    /// The up projection (`lora_B`, `lora_up`), [out, r].
    Up,
    /// A per-layer scalar alpha.
    Alpha,
}

/// A parsed LoRA tensor key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedKey {
    /// Canonical module path, with the component prefix.
    pub module: String,
    pub part: Part,
    /// Whether the key used the kohya layout.
    pub kohya: bool,
}

/// Split a kohya-flattened module path (`down_blocks_0_attentions_0_...`)
/// back into the dotted diffusers path.
pub fn unflatten_module(flat: &str) -> Result<String> {
    let pieces: Vec<&str> = flat.split('_').collect();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < pieces.len() {
        if !pieces[i].is_empty() && pieces[i].bytes().all(|b| b.is_ascii_digit()) {
            out.push(pieces[i].to_string());
            i += 1;
            continue;
        }
        // Longest vocabulary word made of pieces[i..i+n].
        let mut best: Option<usize> = None;
        for word in MODULE_VOCAB {
            let n = word.split('_').count();
            if i + n <= pieces.len()
                && pieces[i..i + n].join("_") == *word
                && best.is_none_or(|b| n > b)
            {
                best = Some(n);
            }
        }
        match best {
            Some(n) => {
                out.push(pieces[i..i + n].join("_"));
                i += n;
            }
            None => bail!(
                "unknown module name piece {:?} in kohya name {flat:?} (known: diffusers / \
                 transformers module names and the original SGM UNet block names)",
                pieces[i..].join("_")
            ),
        }
    }
    Ok(out.join("."))
}

/// Map an original (SGM) UNet module path, as kohya's SDXL LoRAs use it
/// (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`), to diffusers
/// (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`). Assumes
/// diffusers' layout of 2 resnets per down block and 3 per up block (SD 1.x,
/// 2.x, XL). Paths not starting with an SGM block name are returned as is.
pub fn sgm_to_diffusers(path: &str) -> Result<String> {
    let parts: Vec<&str> = path.split('.').collect();
    let idx = |i: usize| -> Result<usize> {
        parts.get(i).and_then(|p| p.parse().ok()).ok_or_else(|| {
            anyhow::anyhow!("SGM module path {path:?}: expected an index at position {i}")
        })
    };
    let resnet = |rest: &[&str]| -> String {
        let r = rest.join(".");
        let mapped = match r.as_str() {
            "in_layers.0" => "norm1",
            "in_layers.2" => "conv1",
            "emb_layers.1" => "time_emb_proj",
            "out_layers.0" => "norm2",
            "out_layers.3" => "conv2",
            "skip_connection" => "conv_shortcut",
            _ => return r,
        };
        mapped.to_string()
    };
    let (head, rest): (String, String) = match parts[0] {
        "input_blocks" => {
            let (n, j) = (idx(1)?, idx(2)?);
            if n == 0 {
                bail!("SGM module path {path:?}: input_blocks.0 is conv_in, not a block");
            }
            let (b, l) = ((n - 1) / 3, (n - 1) % 3);
            match (l, j) {
                (2, 0) => (format!("down_blocks.{b}.downsamplers.0"), "conv".into()),
                (_, 0) => (format!("down_blocks.{b}.resnets.{l}"), resnet(&parts[3..])),
                (_, 1) => (
                    format!("down_blocks.{b}.attentions.{l}"),
                    parts[3..].join("."),
                ),
                _ => bail!("SGM module path {path:?}: unknown sub-block {j}"),
            }
        }
        "middle_block" => match idx(1)? {
            0 => ("mid_block.resnets.0".into(), resnet(&parts[2..])),
            1 => ("mid_block.attentions.0".into(), parts[2..].join(".")),
            2 => ("mid_block.resnets.1".into(), resnet(&parts[2..])),
            j => bail!("SGM module path {path:?}: unknown middle_block sub-block {j}"),
        },
        "output_blocks" => {
            let (n, j) = (idx(1)?, idx(2)?);
            let (b, l) = (n / 3, n % 3);
            let tail = &parts[3..];
            match j {
                0 => (format!("up_blocks.{b}.resnets.{l}"), resnet(tail)),
                1 | 2 if tail.first() == Some(&"conv") => {
                    (format!("up_blocks.{b}.upsamplers.0"), "conv".into())
                }
                1 => (format!("up_blocks.{b}.attentions.{l}"), tail.join(".")),
                _ => bail!("SGM module path {path:?}: unknown sub-block {j}"),
            }
        }
        _ => return Ok(path.to_string()),
    };
    Ok(if rest.is_empty() {
        head
    } else {
        format!("{head}.{rest}")
    })
}

/// Kohya key stem (without `.lora_down.weight`) for a canonical module path.
pub fn kohya_stem(module: &str, two_text_encoders: bool) -> Result<String> {
    let (component, rest) = split_component(module)?;
    let prefix = match (component, two_text_encoders) {
        ("unet", _) => "lora_unet_",
        ("text_encoder", false) => "lora_te_",
        ("text_encoder", true) => "lora_te1_",
        ("text_encoder_2", _) => "lora_te2_",
        _ => bail!("module {module:?} has no kohya prefix"),
    };
    Ok(format!("{prefix}{}", rest.replace('.', "_")))
}

/// Split `unet.down_blocks...` into (`unet`, `down_blocks...`).
pub fn split_component(module: &str) -> Result<(&str, &str)> {
    // Longest component first: `text_encoder_2.` before `text_encoder.`.
    for c in ["text_encoder_2", "text_encoder", "unet"] {
        if let Some(rest) = module.strip_prefix(c).and_then(|r| r.strip_prefix('.')) {
            return Ok((c, rest));
        }
    }
    bail!("module path {module:?} does not start with unet., text_encoder. or text_encoder_2.")
}

/// Add the component prefix to a peft/diffusers module path that may lack it
/// (`base_model.model.` prefixes stripped; `text_model.` means text encoder).
fn canonical_peft_module(path: &str) -> String {
    let path = path.strip_prefix("base_model.model.").unwrap_or(path);
    if split_component(path).is_ok() {
        path.to_string()
    } else if path.starts_with("text_model.") {
        format!("text_encoder.{path}")
    } else {
        format!("unet.{path}")
    }
}

/// Parse one tensor key of a LoRA file. Returns `None` for keys that are not
/// LoRA tensors we know.
pub fn parse_key(key: &str) -> Result<Option<ParsedKey>> {
    // kohya
    for (prefix, component) in [
        ("lora_te1_", "text_encoder"),
        ("lora_te2_", "text_encoder_2"),
        ("lora_te_", "text_encoder"),
        ("lora_unet_", "unet"),
    ] {
        if let Some(rest) = key.strip_prefix(prefix) {
            let (stem, part) = if let Some(s) = rest.strip_suffix(".lora_down.weight") {
                (s, Part::Down)
            } else if let Some(s) = rest.strip_suffix(".lora_up.weight") {
                (s, Part::Up)
            } else if let Some(s) = rest.strip_suffix(".alpha") {
                (s, Part::Alpha)
            } else {
                return Ok(None);
            };
            let mut path = unflatten_module(stem)?;
            if component == "unet" {
                path = sgm_to_diffusers(&path)?;
            }
            let module = format!("{component}.{path}");
            return Ok(Some(ParsedKey {
                module,
                part,
                kohya: true,
            }));
        }
    }
    // peft / diffusers variants, most specific suffix first
    const SUFFIXES: [(&str, Part); 9] = [
        (".lora_A.weight", Part::Down),
        (".lora_B.weight", Part::Up),
        (".lora_linear_layer.down.weight", Part::Down),
        (".lora_linear_layer.up.weight", Part::Up),
        (".lora.down.weight", Part::Down),
        (".lora.up.weight", Part::Up),
        (".lora_down.weight", Part::Down),
        (".lora_up.weight", Part::Up),
        (".alpha", Part::Alpha),
    ];
    for (suffix, part) in SUFFIXES {
        if let Some(stem) = key.strip_suffix(suffix) {
            let stem = undo_attn_processor(stem);
            return Ok(Some(ParsedKey {
                module: canonical_peft_module(&stem),
                part,
                kohya: false,
            }));
        }
    }
    // Old diffusers attention processors: `<attn>.processor.to_q_lora.down.weight`.
    for (suffix, part) in [(".down.weight", Part::Down), (".up.weight", Part::Up)] {
        if let Some(stem) = key.strip_suffix(suffix) {
            if stem.contains(".processor.") && stem.ends_with("_lora") {
                let stem = undo_attn_processor(stem);
                return Ok(Some(ParsedKey {
                    module: canonical_peft_module(&stem),
                    part,
                    kohya: false,
                }));
            }
        }
    }
    Ok(None)
}

/// `attn1.processor.to_q_lora` -> `attn1.to_q`, `to_out_lora` -> `to_out.0`.
fn undo_attn_processor(stem: &str) -> String {
    match stem.rsplit_once(".processor.") {
        Some((head, tail)) => match tail.strip_suffix("_lora") {
            Some("to_out") => format!("{head}.to_out.0"),
            Some(proj) => format!("{head}.{proj}"),
            None => stem.to_string(),
        },
        None => stem.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unflatten_examples() {
        assert_eq!(
            unflatten_module("down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_out_0")
                .unwrap(),
            "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0"
        );
        assert_eq!(
            unflatten_module("mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj").unwrap(),
            "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"
        );
        assert_eq!(
            unflatten_module("up_blocks_1_resnets_2_conv_shortcut").unwrap(),
            "up_blocks.1.resnets.2.conv_shortcut"
        );
        assert_eq!(
            unflatten_module("text_model_encoder_layers_11_self_attn_q_proj").unwrap(),
            "text_model.encoder.layers.11.self_attn.q_proj"
        );
        assert!(unflatten_module("input_blocks_4_1_bogus").is_err());
    }

    #[test]
    fn sgm_names_map_to_diffusers() {
        for (sgm, diffusers) in [
            (
                "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            ),
            (
                "input_blocks_8_1_proj_in",
                "down_blocks.2.attentions.1.proj_in",
            ),
            (
                "input_blocks_1_0_in_layers_2",
                "down_blocks.0.resnets.0.conv1",
            ),
            (
                "input_blocks_5_0_skip_connection",
                "down_blocks.1.resnets.1.conv_shortcut",
            ),
            ("input_blocks_3_0_op", "down_blocks.0.downsamplers.0.conv"),
            (
                "middle_block_1_transformer_blocks_9_ff_net_2",
                "mid_block.attentions.0.transformer_blocks.9.ff.net.2",
            ),
            (
                "middle_block_2_emb_layers_1",
                "mid_block.resnets.1.time_emb_proj",
            ),
            (
                "output_blocks_0_1_transformer_blocks_3_attn2_to_out_0",
                "up_blocks.0.attentions.0.transformer_blocks.3.attn2.to_out.0",
            ),
            (
                "output_blocks_5_1_proj_out",
                "up_blocks.1.attentions.2.proj_out",
            ),
            (
                "output_blocks_7_0_out_layers_3",
                "up_blocks.2.resnets.1.conv2",
            ),
            ("output_blocks_2_2_conv", "up_blocks.0.upsamplers.0.conv"),
        ] {
            let key = format!("lora_unet_{sgm}.lora_down.weight");
            let p = parse_key(&key).unwrap().unwrap();
            assert_eq!(p.module, format!("unet.{diffusers}"), "{sgm}");
        }
    }

    #[test]
    fn parse_key_variants() {
        let m = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
        for key in [
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
            "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight",
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_linear_layer.down.weight",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight",
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
        ] {
            let p = parse_key(key).unwrap().unwrap();
            assert_eq!(p.module, m, "{key}");
            assert_eq!(p.part, Part::Down, "{key}");
        }
        let p = parse_key("lora_te2_text_model_encoder_layers_3_mlp_fc1.alpha")
            .unwrap()
            .unwrap();
        assert_eq!(
            p.module,
            "text_encoder_2.text_model.encoder.layers.3.mlp.fc1"
        );
        assert_eq!(p.part, Part::Alpha);
        let p = parse_key(
            "base_model.model.text_model.encoder.layers.0.self_attn.k_proj.lora_B.weight",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            p.module,
            "text_encoder.text_model.encoder.layers.0.self_attn.k_proj"
        );
        assert_eq!(p.part, Part::Up);
        let p = parse_key("unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight")
            .unwrap()
            .unwrap();
        assert_eq!(
            p.module,
            "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0"
        );
        assert!(parse_key("unet.conv_in.weight").unwrap().is_none());
    }
}
