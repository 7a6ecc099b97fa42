//! Must-show 1 and 2 of the training issue, on the tiny model:
//! the LoRA gradients of every targeted layer (self- and cross-attention
//! q, k, v, out) are non-zero and match central finite differences in f64;
//! and frozen base weights get no gradient buffer.

use std::collections::HashSet;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use selma_diffusion::init::{init_model, Preset};
use selma_diffusion::nn::{set_frozen_fast_path, Adaptable, LayerKind};
use selma_diffusion::pipeline::StableDiffusion;
use selma_train::lora::{LoraSet, DEFAULT_TARGETS};
use selma_train::rng::TrainRng;
use selma_train::trainer::diffusion_loss;

pub(crate) struct Setup {
    pub(crate) sd: StableDiffusion,
    pub(crate) lora: LoraSet,
    pub(crate) latents: Tensor,
    pub(crate) noise: Tensor,
    pub(crate) context: Tensor,
    pub(crate) timesteps: Vec<usize>,
}

pub(crate) fn setup(dir: &Path, dtype: DType) -> Setup {
    let m = dir.join("tiny");
    init_model(Preset::Tiny, &m, 11).unwrap();
    let dev = Device::Cpu;
    let mut sd = StableDiffusion::load(&m, &dev, dtype).unwrap();
    let mut rng = TrainRng::new(5);
    let targets: Vec<String> = DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect();
    let lora = LoraSet::attach(
        &mut sd.unet,
        "unet",
        &targets,
        2,
        4.0,
        &mut rng,
        &dev,
        dtype,
    )
    .unwrap();
    // B starts at zero (so dL/dA = 0 at init); give it values so both factors get gradients.
    for l in &lora.layers {
        let up = rng.randn(l.up.shape().clone(), 0.05, &dev, dtype).unwrap();
        l.up.set(&up).unwrap();
    }
    // 6x10 latents: no activation shape ([tokens, dim]) coincides with a weight shape.
    let latents = rng.randn((2, 4, 6, 10), 1.0, &dev, dtype).unwrap();
    // As a variable, the latents make every op of the UNet track gradients, so
    // the composite (f64-capable) norms are used everywhere.
    let latents = candle_core::Var::from_tensor(&latents)
        .unwrap()
        .as_tensor()
        .clone();
    let noise = rng.randn((2, 4, 6, 10), 1.0, &dev, dtype).unwrap();
    // The context is a constant of the loss; random values stand in for the
    // text encoder (whose fused inference kernels are f32/f16/bf16 only).
    let context = rng.randn((2, 77, 32), 1.0, &dev, dtype).unwrap();
    Setup {
        sd,
        lora,
        latents,
        noise,
        context,
        timesteps: vec![137, 802],
    }
}

fn loss(s: &Setup) -> Tensor {
    let sched = s.sd.scheduler_config.noise_schedule();
    diffusion_loss(
        &s.sd.unet,
        &sched,
        s.sd.scheduler_config.prediction_type,
        Some(5.0),
        &s.latents,
        &s.noise,
        &s.timesteps,
        &s.context,
        None,
    )
    .unwrap()
}

pub(crate) fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn lora_gradients_match_central_finite_differences_in_f64() {
    let dir = tempfile::tempdir().unwrap();
    let s = setup(dir.path(), DType::F64);
    // Every attention projection of both kinds is adapted.
    let paths: Vec<&str> = s.lora.layers.iter().map(|l| l.path.as_str()).collect();
    for attn in ["attn1", "attn2"] {
        for proj in ["to_q", "to_k", "to_v", "to_out.0"] {
            let suffix = format!("{attn}.{proj}");
            assert!(
                paths.iter().any(|p| p.ends_with(&suffix)),
                "no adapted layer ends with {suffix}: {paths:?}"
            );
        }
    }
    assert_eq!(paths.len() % 8, 0, "{paths:?}");

    let grads = loss(&s).backward().unwrap();
    let mut rng = TrainRng::new(99);
    let h = 1e-5;
    let mut worst = 0f64;
    for l in &s.lora.layers {
        for (name, var) in [("lora_A", &l.down), ("lora_B", &l.up)] {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{}.{name}: no gradient", l.path));
            let gv: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
            let gmax = gv.iter().fold(0f64, |a, b| a.max(b.abs()));
            assert!(gmax > 0.0, "{}.{name}: gradient is all zero", l.path);
            // Check the largest entry and two random ones.
            let argmax = (0..gv.len())
                .max_by(|&a, &b| gv[a].abs().total_cmp(&gv[b].abs()))
                .unwrap();
            let picks = [
                argmax,
                rng.below(gv.len() as u64) as usize,
                rng.below(gv.len() as u64) as usize,
            ];
            let orig = var.as_tensor().copy().unwrap();
            let shape = orig.shape().clone();
            let base: Vec<f64> = orig.flatten_all().unwrap().to_vec1().unwrap();
            for &i in &picks {
                let eval = |delta: f64| {
                    let mut v = base.clone();
                    v[i] += delta;
                    var.set(&Tensor::from_vec(v, shape.clone(), &Device::Cpu).unwrap())
                        .unwrap();
                    scalar(&loss(&s))
                };
                let fd = (eval(h) - eval(-h)) / (2.0 * h);
                var.set(&orig).unwrap();
                let an = gv[i];
                // Relative error, with a floor of 1e-3 of the tensor's largest
                // gradient so entries that are ~0 are compared absolutely.
                let denom = an.abs().max(fd.abs()).max(1e-3 * gmax);
                let rel = (an - fd).abs() / denom;
                worst = worst.max(rel);
                assert!(
                    rel < 1e-4,
                    "{}.{name}[{i}]: analytic {an:e} vs finite difference {fd:e} (rel {rel:e})",
                    l.path
                );
            }
        }
    }
    eprintln!(
        "checked {} layers x 2 factors x 3 entries, worst relative error {worst:e}",
        s.lora.layers.len()
    );
}

/// Shapes of every frozen Linear/Conv2d weight (and of a Linear weight's transpose).
fn frozen_shapes(model: &mut dyn Adaptable) -> HashSet<Vec<usize>> {
    let mut set = HashSet::new();
    model.visit_adaptable("", &mut |_, l| match l.kind() {
        LayerKind::Linear { in_dim, out_dim } => {
            set.insert(vec![out_dim, in_dim]);
            set.insert(vec![in_dim, out_dim]);
        }
        LayerKind::Conv2d {
            in_ch,
            out_ch,
            kh,
            kw,
        } => {
            set.insert(vec![out_ch, in_ch, kh, kw]);
        }
    });
    set
}

/// Gradient entries (other than the LoRA variables) shaped like a frozen weight.
fn weight_shaped_grads(s: &mut Setup) -> usize {
    let shapes = frozen_shapes(&mut s.sd.unet);
    let mut lora_ids: HashSet<_> = s.lora.vars().iter().map(|v| v.as_tensor().id()).collect();
    lora_ids.insert(s.latents.id());
    let grads = loss(s).backward().unwrap();
    for v in s.lora.vars() {
        assert!(
            grads.get(v.as_tensor()).is_some(),
            "LoRA variable without gradient"
        );
    }
    grads
        .get_ids()
        .filter(|id| !lora_ids.contains(id))
        .filter_map(|id| grads.get_id(*id))
        .filter(|g| shapes.contains(g.dims()))
        .inspect(|g| eprintln!("weight-shaped gradient {:?}", g.dims()))
        .count()
}

#[test]
fn frozen_weights_get_no_gradient_buffer() {
    // Toggles the process-wide fast path, which the other tests rely on.
    if !crate::in_own_process("gradients::frozen_weights_get_no_gradient_buffer") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut s = setup(dir.path(), DType::F32);
    set_frozen_fast_path(false);
    let slow = weight_shaped_grads(&mut s);
    set_frozen_fast_path(true);
    let fast = weight_shaped_grads(&mut s);
    // Plain candle ops leave a weight-sized gradient for every frozen layer on
    // the backward path (this proves the check can fail); the fast path, none.
    assert!(
        slow > 10,
        "expected weight gradients with plain ops, got {slow}"
    );
    assert_eq!(fast, 0, "frozen weights received {fast} gradient buffers");
}
