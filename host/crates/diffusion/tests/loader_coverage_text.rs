//! Loader coverage of the text encoders: building CLIP from the real SD 1.5,
//! SD 2.1 and SDXL (both encoders) key lists consumes every key with the
//! right shape, none missing. Weights are zero-cost broadcast views
//! (`ShapeOnlySource`), so nothing gigabyte-sized is allocated.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use selma_diffusion::clip::{ClipTextConfig, ClipTextModel, HiddenLayer};
use selma_diffusion::nn::adaptable_paths;
use selma_diffusion::weights::{ShapeOnlySource, TensorSource, Vb};

fn fixture(part: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sd-layouts")
        .join(part)
}

/// Builds the encoder of `part` and checks full coverage; returns the model,
/// the number of keys and of parameters.
fn build(part: &str) -> Result<(ClipTextModel, usize, usize)> {
    let dir = fixture(part);
    let cfg = ClipTextConfig::from_file(&dir.join("config.json"))?;
    let src = Arc::new(ShapeOnlySource::from_file(&dir.join("keys.txt"))?);
    let keys = src.keys().len();
    let params: usize = src
        .keys()
        .iter()
        .map(|k| src.shape(k).unwrap().iter().product::<usize>())
        .sum();
    let vb = Vb::new(src, DType::F32, &Device::Cpu);
    let model = ClipTextModel::load(&vb, &cfg)?;
    assert_eq!(
        vb.unused_keys(),
        Vec::<String>::new(),
        "{part}: unused keys"
    );
    assert_eq!(
        vb.missing_keys(),
        Vec::<String>::new(),
        "{part}: missing keys"
    );
    vb.check_fully_used()?;
    assert_eq!(vb.used_count(), keys);
    Ok((model, keys, params))
}

#[test]
fn sd15_text_encoder_consumes_every_key() -> Result<()> {
    let (mut m, keys, params) = build("sd15/text_encoder")?;
    assert_eq!(keys, 196);
    // README: CLIP-L 123.1M parameters.
    assert_eq!((params as f64 / 1e5).round() / 10.0, 123.1);
    assert_eq!(m.layers.len(), 12);
    assert!(m.text_projection.is_none());
    assert_eq!(
        m.config.activation()?,
        selma_diffusion::nn::Activation::QuickGelu
    );
    // 12 layers x (q, k, v, out, fc1, fc2) LoRA-capable linears, diffusers paths.
    let paths = adaptable_paths(&mut m);
    assert_eq!(paths.len(), 72);
    assert_eq!(paths[0], "text_model.encoder.layers.0.self_attn.q_proj");
    assert!(paths.contains(&"text_model.encoder.layers.11.mlp.fc2".to_string()));
    Ok(())
}

#[test]
fn sd21_text_encoder_consumes_every_key() -> Result<()> {
    let (m, keys, params) = build("sd21/text_encoder")?;
    assert_eq!(keys, 372);
    assert_eq!((params as f64 / 1e5).round() / 10.0, 340.4);
    assert_eq!(m.layers.len(), 23);
    assert_eq!(
        m.config.activation()?,
        selma_diffusion::nn::Activation::GeluErf
    );
    Ok(())
}

#[test]
fn sdxl_text_encoders_consume_every_key() -> Result<()> {
    let (m1, k1, _) = build("sdxl/text_encoder")?;
    assert_eq!(k1, 196);
    assert!(m1.text_projection.is_none());
    let (mut m2, k2, params2) = build("sdxl/text_encoder_2")?;
    assert_eq!(k2, 517);
    assert_eq!((params2 as f64 / 1e5).round() / 10.0, 694.7);
    assert_eq!(m2.layers.len(), 32);
    let proj = m2.text_projection.as_ref().expect("text_projection loaded");
    assert_eq!(proj.weight.dims(), &[1280, 1280]);
    assert!(proj.bias.is_none());
    assert!(adaptable_paths(&mut m2).contains(&"text_projection".to_string()));
    Ok(())
}

#[test]
fn wrong_config_names_the_key_and_file() -> Result<()> {
    let dir = fixture("sd15/text_encoder");
    let mut cfg = ClipTextConfig::from_file(&dir.join("config.json"))?;
    cfg.intermediate_size = 4096;
    let src = Arc::new(ShapeOnlySource::from_file(&dir.join("keys.txt"))?);
    let err = format!(
        "{:#}",
        ClipTextModel::load(&Vb::new(src, DType::F32, &Device::Cpu), &cfg).unwrap_err()
    );
    assert!(
        // This checkpoint has no `text_model.` prefix: the error names the real key.
        err.contains("encoder.layers.0.mlp.fc1.weight")
            && err.contains("[3072, 768]")
            && err.contains("[4096, 768]")
            && err.contains("sd15/text_encoder/keys.txt"),
        "{err}"
    );
    // One layer too few leaves layer 11's keys unused.
    let mut cfg = ClipTextConfig::from_file(&dir.join("config.json"))?;
    cfg.num_hidden_layers = 11;
    let src = Arc::new(ShapeOnlySource::from_file(&dir.join("keys.txt"))?);
    let vb = Vb::new(src, DType::F32, &Device::Cpu);
    ClipTextModel::load(&vb, &cfg)?;
    let unused = vb.unused_keys();
    assert_eq!(unused.len(), 16);
    assert!(unused.iter().all(|k| k.starts_with("encoder.layers.11.")));
    Ok(())
}

#[test]
fn full_size_sd15_encoder_runs_on_zero_weights() -> Result<()> {
    // With all-zero weights every layer is the identity on a zero residual
    // stream and the final norm returns its (zero) bias: the output is 0.
    let (m, _, _) = build("sd15/text_encoder")?;
    let ids = Tensor::new(&[[49406u32, 320, 1125, 49407, 49407]], &Device::Cpu)?;
    let out = m.forward(&ids, HiddenLayer::Last)?;
    assert_eq!(out.hidden.dims(), &[1, 5, 768]);
    assert_eq!(out.pooled.dims(), &[1, 768]);
    let s = out.hidden.abs()?.sum_all()?.to_scalar::<f32>()?;
    assert_eq!(s, 0.0);
    Ok(())
}
