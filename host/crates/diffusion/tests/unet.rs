//! UNet tests: loader coverage of the real SD 1.5 / 2.1 / SDXL layouts (shape
//! only), numerics against candle-transformers' independent UNet on a tiny
//! random model (SD1 conv projections and SD2 linear projections), and
//! per-sample timesteps.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::stable_diffusion::unet_2d as reference;
use selma_diffusion::nn::{adaptable_paths, Activation};
use selma_diffusion::unet::{SdxlAdded, UNet2DConditionModel, UNetConfig};
use selma_diffusion::weights::{SafetensorsSource, ShapeOnlySource, TensorSource, Vb};

fn fixture(model: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sd-layouts")
        .join(model)
        .join("unet")
}

/// Builds the full-size UNet of `model` from shape-only weights and checks
/// that exactly the checkpoint's keys were consumed, with their shapes, and
/// that the LoRA visitor reaches every Linear/Conv2d under its checkpoint path.
fn check_coverage(model: &str) {
    let dir = fixture(model);
    let config = UNetConfig::from_file(&dir.join("config.json")).unwrap();
    let source = Arc::new(ShapeOnlySource::from_file(&dir.join("keys.txt")).unwrap());
    let vb = Vb::new(source.clone(), DType::F32, &Device::Cpu);
    let mut unet =
        UNet2DConditionModel::load(&vb, &config).unwrap_or_else(|e| panic!("{model}: {e:#}"));
    assert_eq!(
        vb.unused_keys(),
        Vec::<String>::new(),
        "{model}: unused keys"
    );
    assert_eq!(
        vb.missing_keys(),
        Vec::<String>::new(),
        "{model}: missing keys"
    );

    // Every weight of rank >= 2 belongs to a Linear or Conv2d; the visitor must
    // name each of them exactly once, by its checkpoint module path.
    let want: BTreeSet<String> = source
        .keys()
        .into_iter()
        .filter(|k| k.ends_with(".weight") && source.shape(k).unwrap().len() >= 2)
        .map(|k| k.trim_end_matches(".weight").to_string())
        .collect();
    let paths = adaptable_paths(&mut unet);
    let got: BTreeSet<String> = paths.iter().cloned().collect();
    assert_eq!(got.len(), paths.len(), "{model}: a layer was visited twice");
    assert_eq!(
        got, want,
        "{model}: adaptable paths differ from the checkpoint's layers"
    );
}

#[test]
fn unet_loader_covers_sd15_layout() {
    check_coverage("sd15");
}

#[test]
fn unet_loader_covers_sd21_layout() {
    check_coverage("sd21");
}

#[test]
fn unet_loader_covers_sdxl_layout() {
    check_coverage("sdxl");
}

/// A seeded SplitMix64 stream, so the test weights are reproducible.
struct Rng(selma_rng::SplitMix64);
impl Rng {
    fn new(seed: u64) -> Self {
        Self(selma_rng::SplitMix64::new(seed))
    }
    fn next_f32(&mut self) -> f32 {
        // uniform in [-1, 1) from the top 24 bits
        (self.0.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn tensor(&mut self, shape: &[usize], scale: f32, offset: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| offset + scale * self.next_f32()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }
}

/// Random weights for the key set candle-transformers' UNet asks for:
/// matrices ~ U(±sqrt(3/fan_in)), biases ~ U(±0.1), norm weights ~ 1 ± 0.2.
fn write_random_weights(
    keys: &BTreeMap<String, Vec<usize>>,
    seed: u64,
    path: &Path,
) -> HashMap<String, Tensor> {
    let mut rng = Rng::new(seed);
    let mut out = HashMap::new();
    for (k, shape) in keys {
        let t = if shape.len() >= 2 {
            let fan_in: usize = shape[1..].iter().product();
            rng.tensor(shape, (3.0 / fan_in as f32).sqrt(), 0.0)
        } else if k.ends_with("norm.weight") || k.contains(".norm") && k.ends_with(".weight") {
            rng.tensor(shape, 0.2, 1.0)
        } else {
            rng.tensor(shape, 0.1, 0.0)
        };
        out.insert(k.clone(), t);
    }
    candle_core::safetensors::save(&out, path).unwrap();
    out
}

/// The tiny SD-style config: down blocks with and without cross-attention,
/// a mid block, 2 resnets per block, small channels. `norm_num_groups` stays
/// at SD's 32: candle-transformers' Down/UpBlock2D ignore the configured group
/// count for their resnets (they always use 32), so other values would make
/// the reference compute a different function.
fn tiny_config_json(linear: bool) -> String {
    let heads = if linear { "[2, 4, 4]" } else { "4" };
    format!(
        r#"{{
        "block_out_channels": [32, 64, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 2,
        "attention_head_dim": {heads},
        "cross_attention_dim": 24,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "use_linear_projection": {linear},
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "in_channels": 4, "out_channels": 4, "sample_size": 16
    }}"#
    )
}

fn reference_config(cfg: &UNetConfig) -> reference::UNet2DConditionModelConfig {
    let blocks = cfg
        .block_out_channels
        .iter()
        .enumerate()
        .map(|(i, &c)| reference::BlockConfig {
            out_channels: c,
            use_cross_attn: (cfg.down_block_types[i]
                == selma_diffusion::unet::BlockKind::CrossAttn)
                .then_some(1),
            attention_head_dim: cfg.num_attention_heads[i],
        })
        .collect();
    reference::UNet2DConditionModelConfig {
        blocks,
        layers_per_block: 2,
        norm_num_groups: cfg.norm_num_groups,
        norm_eps: cfg.norm_eps,
        cross_attention_dim: cfg.cross_attention_dim[0],
        use_linear_projection: cfg.use_linear_projection,
        ..Default::default()
    }
}

/// Writes seeded random weights with exactly the keys candle-transformers'
/// UNet requests, then loads our model and theirs from that one file.
fn tiny_pair(
    linear: bool,
    dir: &Path,
) -> (
    UNet2DConditionModel,
    reference::UNet2DConditionModel,
    UNetConfig,
) {
    let cfg = UNetConfig::from_json_str(&tiny_config_json(linear)).unwrap();
    let dev = Device::Cpu;
    // Ask candle-transformers which tensors it needs (VarMap records them).
    let varmap = candle_nn::VarMap::new();
    let vs = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    reference::UNet2DConditionModel::new(vs, 4, 4, false, reference_config(&cfg)).unwrap();
    let keys: BTreeMap<String, Vec<usize>> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect();
    let path = dir.join(if linear {
        "tiny_linear.safetensors"
    } else {
        "tiny.safetensors"
    });
    write_random_weights(&keys, if linear { 7 } else { 42 }, &path);

    let vb = Vb::new(
        Arc::new(SafetensorsSource::open(&[&path]).unwrap()),
        DType::F32,
        &dev,
    );
    let ours = UNet2DConditionModel::load(&vb, &cfg).unwrap();
    assert_eq!(vb.unused_keys(), Vec::<String>::new());
    let vs = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&[&path], DType::F32, &dev).unwrap()
    };
    let theirs =
        reference::UNet2DConditionModel::new(vs, 4, 4, false, reference_config(&cfg)).unwrap();
    (ours, theirs, cfg)
}

fn inputs(cfg: &UNetConfig, seed: u64) -> (Tensor, Tensor) {
    let mut rng = Rng::new(seed);
    let sample = rng.tensor(&[2, 4, 16, 16], 1.5, 0.0);
    let context = rng.tensor(&[2, 7, cfg.cross_attention_dim[0]], 1.0, 0.0);
    (sample, context)
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap();
    diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap()
}

fn compare_with_candle_transformers(linear: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (mut ours, theirs, cfg) = tiny_pair(linear, dir.path());
    let (sample, context) = inputs(&cfg, 3);
    let t = 421.0;
    let want = theirs.forward(&sample, t, &context).unwrap();
    let ts = Tensor::new(&[t as f32, t as f32], &Device::Cpu).unwrap();

    // diffusers' GEGLU uses the exact erf GELU; candle-transformers uses the
    // tanh approximation. To compare the same function we switch ours to tanh
    // here; the default (erf) is checked to differ only slightly below.
    ours.set_geglu_activation(Activation::GeluTanh);
    let got = ours.forward(&sample, &ts, &context, None).unwrap();
    let rel = max_rel_diff(&got, &want);
    println!("linear={linear}: max |ours - candle-transformers| / max |ref| = {rel:e}");
    assert!(rel < 1e-4, "linear={linear}: relative difference {rel}");
    let spread = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(spread > 1e-2, "degenerate output (max |y| = {spread})");

    ours.set_geglu_activation(Activation::GeluErf);
    let erf = ours.forward(&sample, &ts, &context, None).unwrap();
    let rel_erf = max_rel_diff(&erf, &want);
    println!("linear={linear}: with diffusers' erf GELU the difference is {rel_erf:e}");
    assert!(
        rel_erf > 10.0 * rel && rel_erf < 5e-2,
        "erf vs tanh GELU should differ a little: {rel_erf}"
    );
}

#[test]
fn unet_matches_candle_transformers_sd1_conv_projection() {
    compare_with_candle_transformers(false);
}

#[test]
fn unet_matches_candle_transformers_sd2_linear_projection() {
    compare_with_candle_transformers(true);
}

#[test]
fn unet_per_sample_timesteps_equal_single_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, _, cfg) = tiny_pair(false, dir.path());
    let (sample, context) = inputs(&cfg, 11);
    let ts = Tensor::new(&[15f32, 870.0], &Device::Cpu).unwrap();
    let batch = ours.forward(&sample, &ts, &context, None).unwrap();
    for i in 0..2 {
        let one = ours
            .forward(
                &sample.narrow(0, i, 1).unwrap(),
                &ts.narrow(0, i, 1).unwrap(),
                &context.narrow(0, i, 1).unwrap(),
                None,
            )
            .unwrap();
        let rel = max_rel_diff(&batch.narrow(0, i, 1).unwrap(), &one);
        assert!(rel < 1e-5, "sample {i}: {rel}");
    }
    // And the two timesteps really matter: swapping them changes the result.
    let swapped = Tensor::new(&[870f32, 15.0], &Device::Cpu).unwrap();
    let other = ours.forward(&sample, &swapped, &context, None).unwrap();
    assert!(max_rel_diff(&other, &batch) > 1e-3);
}

/// A tiny SDXL-style UNet (text_time added embeddings, per-block transformer
/// depths, linear projections, first block without attention): the added
/// conditioning is required, and each sample only sees its own time ids.
#[test]
fn unet_sdxl_added_embeddings_are_per_sample() {
    let cfg = UNetConfig::from_json_str(
        r#"{
        "block_out_channels": [32, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 1, "attention_head_dim": [2, 4],
        "transformer_layers_per_block": [1, 2], "cross_attention_dim": 24,
        "norm_num_groups": 8, "use_linear_projection": true,
        "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 64
    }"#,
    )
    .unwrap();
    // 64 = pooled 16 + 6 time ids * 8
    let mut rng = Rng::new(5);
    let mut shapes = BTreeMap::new();
    // Discover the key set: loading stops at the first missing key and names
    // it with its expected shape; grow the set until the model loads.
    loop {
        let src = ShapeOnlySource::from_shapes(shapes.clone(), "probe");
        let vb = Vb::new(Arc::new(src), DType::F32, &Device::Cpu);
        match UNet2DConditionModel::load(&vb, &cfg) {
            Ok(_) => break,
            Err(e) => {
                let msg = format!("{e:#}");
                let (key, dims) = parse_missing(&msg).unwrap_or_else(|| panic!("{msg}"));
                shapes.insert(key, dims);
            }
        }
    }
    let tensors: Vec<(String, Tensor)> = shapes
        .iter()
        .map(|(k, s)| {
            let t = if s.len() >= 2 {
                let fan_in: usize = s[1..].iter().product();
                rng.tensor(s, (3.0 / fan_in as f32).sqrt(), 0.0)
            } else {
                rng.tensor(
                    s,
                    0.1,
                    if k.contains("norm") && k.ends_with("weight") {
                        1.0
                    } else {
                        0.0
                    },
                )
            };
            (k.clone(), t)
        })
        .collect();
    let src = selma_diffusion::weights::MemorySource::new(tensors, "tiny-sdxl");
    let vb = Vb::new(Arc::new(src), DType::F32, &Device::Cpu);
    let unet = UNet2DConditionModel::load(&vb, &cfg).unwrap();
    assert!(vb.unused_keys().is_empty());
    assert!(shapes.contains_key("add_embedding.linear_1.weight"));
    assert_eq!(shapes["add_embedding.linear_1.weight"], vec![128, 64]);

    let sample = rng.tensor(&[2, 4, 8, 8], 1.0, 0.0);
    let context = rng.tensor(&[2, 5, 24], 1.0, 0.0);
    let ts = Tensor::new(&[500f32, 500.0], &Device::Cpu).unwrap();
    let text_embeds = rng.tensor(&[2, 16], 1.0, 0.0);
    let ids = Tensor::new(
        &[
            [1024f32, 1024., 0., 0., 1024., 1024.],
            [512., 768., 16., 32., 512., 768.],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let added = SdxlAdded {
        text_embeds: text_embeds.clone(),
        time_ids: ids.clone(),
    };
    assert!(
        unet.forward(&sample, &ts, &context, None).is_err(),
        "SDXL needs added embeddings"
    );
    let out = unet.forward(&sample, &ts, &context, Some(&added)).unwrap();
    assert_eq!(out.dims(), &[2, 4, 8, 8]);
    // Changing sample 1's time ids changes sample 1 only.
    let ids2 = Tensor::cat(
        &[
            ids.narrow(0, 0, 1).unwrap(),
            (ids.narrow(0, 1, 1).unwrap() + 64.0).unwrap(),
        ],
        0,
    )
    .unwrap();
    let out2 = unet
        .forward(
            &sample,
            &ts,
            &context,
            Some(&SdxlAdded {
                text_embeds,
                time_ids: ids2,
            }),
        )
        .unwrap();
    let d0 = max_rel_diff(
        &out2.narrow(0, 0, 1).unwrap(),
        &out.narrow(0, 0, 1).unwrap(),
    );
    let d1 = max_rel_diff(
        &out2.narrow(0, 1, 1).unwrap(),
        &out.narrow(0, 1, 1).unwrap(),
    );
    assert!(d0 < 1e-6, "sample 0 changed by {d0}");
    assert!(d1 > 1e-4, "sample 1 did not change ({d1})");
}

/// Parses `weight KEY is missing from ... (expected shape [a, b])`.
fn parse_missing(msg: &str) -> Option<(String, Vec<usize>)> {
    let rest = msg.split_once("weight ")?.1;
    let key = rest.split_once(" is missing")?.0.to_string();
    let shape = rest.split("expected shape [").nth(1)?.split(']').next()?;
    let dims = shape
        .split(',')
        .map(|s| s.trim().parse().ok())
        .collect::<Option<Vec<usize>>>()?;
    Some((key, dims))
}

/// LoRA gradients flow through the whole UNet, including through the
/// attention softmax into `to_q`/`to_k` (candle's fused softmax has no
/// backward): the gradient of one `to_k` adapter entry matches a central
/// finite difference of the loss.
#[test]
fn unet_lora_gradients_reach_to_k_and_match_finite_differences() {
    use candle_core::Var;
    use selma_diffusion::nn::{Adaptable, Adapter};
    let dir = tempfile::tempdir().unwrap();
    let (mut ours, _, cfg) = tiny_pair(false, dir.path());
    let (sample, context) = inputs(&cfg, 13);
    let ts = Tensor::new(&[300f32, 650.0], &Device::Cpu).unwrap();
    let target = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k";
    let mut rng = Rng::new(77);
    let up = Var::from_tensor(&rng.tensor(&[32, 2], 0.3, 0.0)).unwrap();
    let down = Var::from_tensor(&rng.tensor(&[2, 32], 0.3, 0.0)).unwrap();
    let mut attached = 0;
    ours.visit_adaptable("", &mut |p, l| {
        if p == target {
            l.add_adapter(Adapter::new(
                up.as_tensor().clone(),
                down.as_tensor().clone(),
                1.0,
                1.0,
            ))
            .unwrap();
            attached += 1;
        }
    });
    assert_eq!(attached, 1);
    let loss = |m: &UNet2DConditionModel| -> Tensor {
        m.forward(&sample, &ts, &context, None)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
    };
    let grads = loss(&ours).backward().unwrap();
    let g_up = grads
        .get(up.as_tensor())
        .expect("no gradient for to_k's LoRA up");
    let g_down = grads
        .get(down.as_tensor())
        .expect("no gradient for to_k's LoRA down");
    let g = g_up.to_vec2::<f32>().unwrap()[5][1] as f64;
    let norm = g_down
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(norm > 0.0 && norm.is_finite(), "down gradient {norm}");

    // Central difference on up[5][1] (the adapters share the Var storage).
    let eps = 1e-2f32;
    let base = up.as_tensor().to_vec2::<f32>().unwrap();
    let eval = |delta: f32| -> f64 {
        let mut v = base.clone();
        v[5][1] += delta;
        up.set(&Tensor::new(v, &Device::Cpu).unwrap()).unwrap();
        loss(&ours).to_scalar::<f32>().unwrap() as f64
    };
    let fd = (eval(eps) - eval(-eps)) / (2.0 * eps as f64);
    assert!(g.abs() > 1e-7, "gradient too small to check: {g}");
    assert!(
        (fd - g).abs() <= 0.05 * g.abs() + 1e-6,
        "autograd {g} vs finite difference {fd}"
    );
}
