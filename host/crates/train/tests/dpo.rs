//! The Diffusion-DPO objective on the tiny model, in f64: its LoRA
//! gradients match central finite differences; with winner = loser the loss
//! is log 2 and every gradient is zero; the reference is the base model with
//! the adapters taken off (equal to a freshly loaded model, unlike the
//! adapted one) and gets no gradient; and the trainer runs it end to end on
//! a folder of preference pairs.

use candle_core::{DType, Device, Tensor, Var};
use selma_diffusion::pipeline::StableDiffusion;
use selma_train::lora::with_adapters_off;
use selma_train::rng::TrainRng;
use selma_train::trainer::{dpo_loss, per_sample_loss, Trainer};

use crate::common::config_in;
use crate::gradients::{scalar, setup, Setup};

const BETA: f64 = 200.0;

/// Winners then losers, noised alike: (latents, noise, context, timesteps).
fn pair_batch(s: &Setup, losers: &Tensor) -> (Tensor, Tensor, Tensor, Vec<usize>) {
    (
        Tensor::cat(&[&s.latents, losers], 0).unwrap(),
        Tensor::cat(&[&s.noise, &s.noise], 0).unwrap(),
        Tensor::cat(&[&s.context, &s.context], 0).unwrap(),
        [s.timesteps.clone(), s.timesteps.clone()].concat(),
    )
}

fn errors(
    unet: &selma_diffusion::unet::UNet2DConditionModel,
    s: &Setup,
    losers: &Tensor,
) -> Tensor {
    let (lat, noise, ctx, ts) = pair_batch(s, losers);
    let sched = s.sd.scheduler_config.noise_schedule();
    per_sample_loss(
        unet,
        &sched,
        s.sd.scheduler_config.prediction_type,
        &lat,
        &noise,
        &ts,
        &ctx,
        None,
    )
    .unwrap()
}

/// (loss, reference errors) of the pairs (s.latents[i], losers[i]).
fn loss(s: &mut Setup, losers: &Tensor) -> (Tensor, Tensor) {
    let policy = errors(&s.sd.unet, s, losers);
    let reference = {
        let (lat, noise, ctx, ts) = pair_batch(s, losers);
        let sched = s.sd.scheduler_config.noise_schedule();
        let pred = s.sd.scheduler_config.prediction_type;
        with_adapters_off(&mut s.sd.unet, |base| {
            per_sample_loss(base, &sched, pred, &lat, &noise, &ts, &ctx, None).unwrap()
        })
    };
    let (l, _) = dpo_loss(&policy, &reference, BETA).unwrap();
    (l, reference)
}

fn var_like(t: &Tensor) -> Tensor {
    Var::from_tensor(t).unwrap().as_tensor().clone()
}

fn losers(s: &Setup) -> Tensor {
    let l = TrainRng::new(17)
        .randn(s.latents.shape().clone(), 1.0, &Device::Cpu, DType::F64)
        .unwrap();
    var_like(&l)
}

#[test]
fn dpo_gradients_match_central_finite_differences_in_f64() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = setup(dir.path(), DType::F64);
    let losers = losers(&s);
    let (l, _) = loss(&mut s, &losers);
    let grads = l.backward().unwrap();
    let h = 1e-5;
    let mut rng = TrainRng::new(3);
    let mut checked = 0;
    let layers = s.lora.layers.clone();
    for layer in layers.iter().step_by(3) {
        for var in [&layer.down, &layer.up] {
            let g: Vec<f64> = grads
                .get(var.as_tensor())
                .expect("every LoRA factor gets a gradient")
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let gmax = g.iter().fold(0f64, |a, b| a.max(b.abs()));
            assert!(gmax > 0.0, "{}: zero gradient", layer.path);
            let argmax = (0..g.len())
                .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
                .unwrap();
            let orig = var.as_tensor().copy().unwrap();
            let base: Vec<f64> = orig.flatten_all().unwrap().to_vec1().unwrap();
            for i in [argmax, rng.below(g.len() as u64) as usize] {
                let mut at = |d: f64| {
                    let mut v = base.clone();
                    v[i] += d;
                    var.set(&Tensor::from_vec(v, orig.shape().clone(), &Device::Cpu).unwrap())
                        .unwrap();
                    scalar(&loss(&mut s, &losers).0)
                };
                let fd = (at(h) - at(-h)) / (2.0 * h);
                var.set(&orig).unwrap();
                let rel = (g[i] - fd).abs() / g[i].abs().max(fd.abs()).max(1e-3 * gmax);
                assert!(
                    rel < 1e-4,
                    "{}[{i}]: analytic {:e} vs finite difference {fd:e}",
                    layer.path,
                    g[i]
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 8, "{checked}");
}

#[test]
fn winner_equal_to_loser_gives_log_two_and_no_gradient() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = setup(dir.path(), DType::F64);
    let same = var_like(&s.latents.copy().unwrap());
    let (l, _) = loss(&mut s, &same);
    assert!(
        (scalar(&l) - std::f64::consts::LN_2).abs() < 1e-12,
        "{}",
        scalar(&l)
    );
    let grads = l.backward().unwrap();
    for v in s.lora.vars() {
        if let Some(g) = grads.get(v.as_tensor()) {
            let m: f64 = g.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            assert!(m < 1e-12, "gradient {m:e} with winner = loser");
        }
    }
}

#[test]
fn reference_is_the_base_without_adapters_and_gets_no_gradient() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = setup(dir.path(), DType::F64);
    let losers = losers(&s);
    let policy_before = errors(&s.sd.unet, &s, &losers);
    let (l, reference) = loss(&mut s, &losers);
    // A freshly loaded model (no adapters at all) gives the same errors.
    let fresh = StableDiffusion::load(&dir.path().join("tiny"), &Device::Cpu, DType::F64).unwrap();
    let base = errors(&fresh.unet, &s, &losers);
    let gap = |a: &Tensor, b: &Tensor| -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    assert!(gap(&reference, &base) < 1e-12, "{}", gap(&reference, &base));
    // The adapted model differs from it (the test can tell them apart), and
    // its adapters are back in place afterwards.
    assert!(
        gap(&policy_before, &base) > 1e-6,
        "{}",
        gap(&policy_before, &base)
    );
    assert_eq!(gap(&errors(&s.sd.unet, &s, &losers), &policy_before), 0.0);
    // The reference is outside the graph of the loss.
    let grads = l.backward().unwrap();
    assert!(
        grads.get(&reference).is_none(),
        "the reference got a gradient"
    );
    for v in s.lora.vars() {
        assert!(grads.get(v.as_tensor()).is_some());
    }
}

/// Preference pairs of the 3-image fixture: 0 over 1, 2 over 1.
fn pairs_config(dir: &std::path::Path) -> selma_train::trainer::TrainConfig {
    let mut cfg = config_in(dir, "dpo.safetensors");
    std::fs::write(
        cfg.data.join("pairs.jsonl"),
        "{\"text\": \"a checkered pattern\", \"winner\": \"img0.png\", \"loser\": \"img1.png\"}\n\
         {\"text\": \"a checkered pattern\", \"winner\": \"img2.png\", \"loser\": \"img1.png\"}\n",
    )
    .unwrap();
    cfg.objective = selma_train::config::Objective::Dpo;
    cfg.min_snr_gamma = None;
    cfg.noise_offset = 0.0;
    cfg.steps = 4;
    cfg
}

#[test]
fn trainer_runs_dpo_on_a_folder_of_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = pairs_config(dir.path());
    let mut t = Trainer::new(cfg.clone()).unwrap();
    assert_eq!(t.dataset.units(), 2);
    // At the start the LoRA is zero: policy = reference, loss = log 2.
    let first = t.train_step().unwrap();
    assert!(
        (first.loss - std::f64::consts::LN_2).abs() < 1e-4,
        "{}",
        first.loss
    );
    assert!(first.grad_norm > 0.0);
    let mut last = first;
    for _ in 1..cfg.steps {
        last = t.train_step().unwrap();
        assert!(last.loss.is_finite());
    }
    assert_ne!(last.loss, first.loss);
    t.save_lora().unwrap();
    assert!(cfg.out.is_file());

    // What cannot work is refused, naming the setting or the file.
    let mut bad = cfg.clone();
    bad.full = true;
    bad.out = dir.path().join("full-out");
    let e = format!("{:#}", Trainer::new(bad).err().unwrap());
    assert!(e.contains("--objective dpo") && e.contains("--full"), "{e}");
    std::fs::remove_file(cfg.data.join("pairs.jsonl")).unwrap();
    let e = format!("{:#}", Trainer::new(cfg.clone()).err().unwrap());
    assert!(e.contains("pairs.jsonl"), "{e}");
    std::fs::write(
        cfg.data.join("pairs.jsonl"),
        "{\"text\": \"x\", \"winner\": \"img0.png\"}\n",
    )
    .unwrap();
    let e = format!("{:#}", Trainer::new(cfg).err().unwrap());
    assert!(e.contains("line 1") && e.contains("loser"), "{e}");
}
