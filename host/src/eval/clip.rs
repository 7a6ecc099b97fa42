//! CLIP model folders for CLIPScore: the Hugging Face `CLIPModel` layout
//! (`config.json` with `text_config` / `vision_config`, `model.safetensors`,
//! `vocab.json` + `merges.txt`), CLIP's image preprocessing (shorter side to
//! `image_size` by bicubic resampling, centre crop, CLIP mean/std), and a
//! tiny random CLIP folder for tests.

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use candle_transformers::models::clip::text_model::{Activation, ClipTextConfig};
use candle_transformers::models::clip::vision_model::ClipVisionConfig;
use candle_transformers::models::clip::ClipConfig;
use safetensors::tensor::{Dtype, TensorView};
use selma_io::write_atomic;
use selma_runtime::RgbImage;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// CLIP's per-channel normalisation mean (RGB, on 0..1).
#[allow(clippy::excessive_precision)] // CLIP's published constants, digit for digit
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP's per-channel normalisation standard deviation (RGB, on 0..1).
#[allow(clippy::excessive_precision)] // CLIP's published constants, digit for digit
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// Tensor names (and shapes) every CLIP checkpoint must hold beyond what
/// the encoder constructors check (candle would silently randomise them).
pub const REQUIRED_EXTRA: [&str; 1] = ["vision_model.embeddings.class_embedding"];

fn sub_config<'a>(cfg: &'a Value, key: &str, path: &Path) -> Result<&'a Value> {
    cfg.get(key)
        .or_else(|| cfg.get(format!("{key}_dict")))
        .with_context(|| {
            format!(
                "{}: no \"{key}\" object: expected a Hugging Face CLIPModel config.json",
                path.display()
            )
        })
}

fn get_usize(v: &Value, section: &str, key: &str, default: usize, path: &Path) -> Result<usize> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x
            .as_u64()
            .filter(|&n| n > 0)
            .map(|n| n as usize)
            .with_context(|| {
                format!(
                    "{}: {section}.{key} is {x}, expected a positive integer",
                    path.display()
                )
            }),
    }
}

fn check_act(v: &Value, section: &str, path: &Path) -> Result<Activation> {
    match v.get("hidden_act").and_then(|a| a.as_str()) {
        None | Some("quick_gelu") => Ok(Activation::QuickGelu),
        Some(other) => bail!(
            "{}: {section}.hidden_act is {other:?}; only \"quick_gelu\" CLIP models (OpenAI's \
             CLIP, e.g. openai/clip-vit-large-patch14) are supported",
            path.display()
        ),
    }
}

fn check_eps(v: &Value, section: &str, path: &Path) -> Result<()> {
    if let Some(eps) = v.get("layer_norm_eps").and_then(|e| e.as_f64()) {
        ensure!(
            (eps - 1e-5).abs() < 1e-9,
            "{}: {section}.layer_norm_eps is {eps}; the CLIP encoder uses 1e-5",
            path.display()
        );
    }
    Ok(())
}

/// Parses a Hugging Face `CLIPModel` config.json (absent keys take the
/// transformers defaults, those of ViT-B/32).
pub fn parse_config(cfg: &Value, path: &Path) -> Result<ClipConfig> {
    let t = sub_config(cfg, "text_config", path)?;
    let v = sub_config(cfg, "vision_config", path)?;
    let top_proj = get_usize(cfg, "config", "projection_dim", 512, path)?;
    let text_config = ClipTextConfig {
        vocab_size: get_usize(t, "text_config", "vocab_size", 49408, path)?,
        embed_dim: get_usize(t, "text_config", "hidden_size", 512, path)?,
        activation: check_act(t, "text_config", path)?,
        intermediate_size: get_usize(t, "text_config", "intermediate_size", 2048, path)?,
        max_position_embeddings: get_usize(t, "text_config", "max_position_embeddings", 77, path)?,
        pad_with: None,
        num_hidden_layers: get_usize(t, "text_config", "num_hidden_layers", 12, path)?,
        num_attention_heads: get_usize(t, "text_config", "num_attention_heads", 8, path)?,
        projection_dim: top_proj,
    };
    check_eps(t, "text_config", path)?;
    let vision_config = ClipVisionConfig {
        embed_dim: get_usize(v, "vision_config", "hidden_size", 768, path)?,
        activation: check_act(v, "vision_config", path)?,
        intermediate_size: get_usize(v, "vision_config", "intermediate_size", 3072, path)?,
        num_hidden_layers: get_usize(v, "vision_config", "num_hidden_layers", 12, path)?,
        num_attention_heads: get_usize(v, "vision_config", "num_attention_heads", 12, path)?,
        projection_dim: top_proj,
        num_channels: get_usize(v, "vision_config", "num_channels", 3, path)?,
        image_size: get_usize(v, "vision_config", "image_size", 224, path)?,
        patch_size: get_usize(v, "vision_config", "patch_size", 32, path)?,
    };
    check_eps(v, "vision_config", path)?;
    ensure!(
        vision_config.num_channels == 3,
        "{}: vision_config.num_channels is {}, expected 3 (RGB)",
        path.display(),
        vision_config.num_channels
    );
    ensure!(
        vision_config
            .image_size
            .is_multiple_of(vision_config.patch_size),
        "{}: vision_config.image_size {} is not a multiple of patch_size {}",
        path.display(),
        vision_config.image_size,
        vision_config.patch_size
    );
    for (section, d, h) in [
        (
            "text_config",
            text_config.embed_dim,
            text_config.num_attention_heads,
        ),
        (
            "vision_config",
            vision_config.embed_dim,
            vision_config.num_attention_heads,
        ),
    ] {
        ensure!(
            d.is_multiple_of(h),
            "{}: {section}.hidden_size {d} is not a multiple of num_attention_heads {h}",
            path.display()
        );
    }
    let logit_scale_init_value = cfg
        .get("logit_scale_init_value")
        .and_then(|x| x.as_f64())
        .unwrap_or(2.6592) as f32;
    let image_size = vision_config.image_size;
    Ok(ClipConfig {
        text_config,
        vision_config,
        logit_scale_init_value,
        image_size,
    })
}

/// Reads and parses `<dir>/config.json`.
pub fn read_config(dir: &Path) -> Result<ClipConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (a CLIP model folder needs config.json, model.safetensors, vocab.json \
             and merges.txt, as in openai/clip-vit-large-patch14)",
            path.display()
        )
    })?;
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("parsing {} as JSON", path.display()))?;
    parse_config(&v, &path)
}

/// CLIP's preprocessing of one image: resize so the shorter side is `size`
/// (bicubic; the longer side `floor(size * long / short)`), centre crop to
/// `size` x `size`, scale to 0..1 and normalise with [`CLIP_MEAN`] /
/// [`CLIP_STD`]. Returns a `[1, 3, size, size]` f32 tensor.
pub fn preprocess(img: &RgbImage, size: usize, device: &Device) -> Result<Tensor> {
    let (w, h) = (img.width as usize, img.height as usize);
    ensure!(w > 0 && h > 0, "cannot score an empty {w}x{h} image");
    ensure!(
        img.pixels.len() == w * h * 3,
        "image of {w}x{h} has {} bytes, expected {}",
        img.pixels.len(),
        w * h * 3
    );
    let (nw, nh) = if w <= h {
        (size, (size as u64 * h as u64 / w as u64) as usize)
    } else {
        ((size as u64 * w as u64 / h as u64) as usize, size)
    };
    let resized: Vec<u8> = if (nw, nh) == (w, h) {
        img.pixels.clone()
    } else {
        let buf = image::RgbImage::from_raw(img.width, img.height, img.pixels.clone())
            .context("image buffer size")?;
        image::imageops::resize(
            &buf,
            nw as u32,
            nh as u32,
            image::imageops::FilterType::CatmullRom,
        )
        .into_raw()
    };
    let (top, left) = ((nh - size) / 2, (nw - size) / 2);
    let mut out = vec![0f32; 3 * size * size];
    for y in 0..size {
        for x in 0..size {
            let p = ((top + y) * nw + left + x) * 3;
            for c in 0..3 {
                let v = resized[p + c] as f32 / 255.0;
                out[c * size * size + y * size + x] = (v - CLIP_MEAN[c]) / CLIP_STD[c];
            }
        }
    }
    Ok(Tensor::from_vec(out, (1, 3, size, size), device)?)
}

/// Names and shapes of every tensor of a CLIPModel checkpoint with `cfg`.
pub fn param_shapes(cfg: &ClipConfig) -> Vec<(String, Vec<usize>)> {
    let mut out: Vec<(String, Vec<usize>)> = vec![];
    let mut encoder = |prefix: &str, d: usize, ff: usize, layers: usize| {
        for i in 0..layers {
            let l = format!("{prefix}.encoder.layers.{i}");
            for p in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                out.push((format!("{l}.self_attn.{p}.weight"), vec![d, d]));
                out.push((format!("{l}.self_attn.{p}.bias"), vec![d]));
            }
            for n in ["layer_norm1", "layer_norm2"] {
                out.push((format!("{l}.{n}.weight"), vec![d]));
                out.push((format!("{l}.{n}.bias"), vec![d]));
            }
            out.push((format!("{l}.mlp.fc1.weight"), vec![ff, d]));
            out.push((format!("{l}.mlp.fc1.bias"), vec![ff]));
            out.push((format!("{l}.mlp.fc2.weight"), vec![d, ff]));
            out.push((format!("{l}.mlp.fc2.bias"), vec![d]));
        }
    };
    let t = &cfg.text_config;
    let v = &cfg.vision_config;
    encoder(
        "text_model",
        t.embed_dim,
        t.intermediate_size,
        t.num_hidden_layers,
    );
    encoder(
        "vision_model",
        v.embed_dim,
        v.intermediate_size,
        v.num_hidden_layers,
    );
    let (td, vd) = (t.embed_dim, v.embed_dim);
    let positions = (v.image_size / v.patch_size).pow(2) + 1;
    out.extend([
        (
            "text_model.embeddings.token_embedding.weight".to_string(),
            vec![t.vocab_size, td],
        ),
        (
            "text_model.embeddings.position_embedding.weight".into(),
            vec![t.max_position_embeddings, td],
        ),
        ("text_model.final_layer_norm.weight".into(), vec![td]),
        ("text_model.final_layer_norm.bias".into(), vec![td]),
        ("vision_model.embeddings.class_embedding".into(), vec![vd]),
        (
            "vision_model.embeddings.patch_embedding.weight".into(),
            vec![vd, v.num_channels, v.patch_size, v.patch_size],
        ),
        (
            "vision_model.embeddings.position_embedding.weight".into(),
            vec![positions, vd],
        ),
        ("vision_model.pre_layrnorm.weight".into(), vec![vd]),
        ("vision_model.pre_layrnorm.bias".into(), vec![vd]),
        ("vision_model.post_layernorm.weight".into(), vec![vd]),
        ("vision_model.post_layernorm.bias".into(), vec![vd]),
        (
            "visual_projection.weight".into(),
            vec![v.projection_dim, vd],
        ),
        ("text_projection.weight".into(), vec![t.projection_dim, td]),
        ("logit_scale".into(), vec![]),
    ]);
    out
}

/// Merges of the tiny test tokenizer.
const TINY_MERGES: usize = 200;

/// Writes a small random CLIP (vision + text) folder for tests (config.json, model.safetensors,
/// tokenizer vocab.json + merges.txt), same seed same bytes.
pub fn init_tiny_clip(dir: &Path, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (vocab, merges) = selma_diffusion::init::tiny_tokenizer(TINY_MERGES);
    let vocab_size = serde_json::from_str::<serde_json::Map<String, Value>>(&vocab)?.len();
    let config = json!({
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": 16,
        "logit_scale_init_value": 2.6592,
        "text_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "num_hidden_layers": 2,
            "max_position_embeddings": 77,
            "vocab_size": vocab_size,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "bos_token_id": vocab_size - 2,
            "eos_token_id": vocab_size - 1,
            "projection_dim": 16
        },
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "num_hidden_layers": 2,
            "image_size": 32,
            "patch_size": 8,
            "num_channels": 3,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "projection_dim": 16
        }
    });
    let cfg = parse_config(&config, &dir.join("config.json"))?;
    let mut values: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for (name, shape) in param_shapes(&cfg) {
        let v = if name == "logit_scale" {
            vec![cfg.logit_scale_init_value]
        } else {
            selma_diffusion::init::init_values(&name, &shape, seed)
        };
        let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        values.insert(name, (shape, bytes));
    }
    let views = values
        .iter()
        .map(|(k, (shape, data))| {
            Ok((k.clone(), TensorView::new(Dtype::F32, shape.clone(), data)?))
        })
        .collect::<Result<Vec<_>>>()?;
    let st = safetensors::tensor::serialize(views, None).context("serialising tiny CLIP")?;
    let mut cfg_text = serde_json::to_string_pretty(&config)?;
    cfg_text.push('\n');
    write_atomic(&dir.join("config.json"), cfg_text.as_bytes())?;
    write_atomic(&dir.join("model.safetensors"), &st)?;
    write_atomic(&dir.join("vocab.json"), vocab.as_bytes())?;
    write_atomic(&dir.join("merges.txt"), merges.as_bytes())?;
    Ok(())
}
