//! AdamW, clipping, LR schedules and accumulation against hand-computed values.

use candle_core::{Device, Tensor, Var};
use selma_train::optim::{clip_grad_norm, AdamW, AdamWConfig, GradAccumulator, LrSchedule};

fn vals(t: &Tensor) -> Vec<f32> {
    t.to_vec1::<f32>().unwrap()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

#[test]
fn adamw_two_steps_match_hand_computation() {
    // p = [1, -2]; lr 0.1 then 0.05; betas (0.9, 0.999), eps 1e-8, decay 0.01.
    // Step 1, g = [0.5, -1]: p *= 1 - 0.1*0.01 -> [0.999, -1.998];
    //   m = 0.1 g = [0.05, -0.1], v = 0.001 g^2 = [2.5e-4, 1e-3];
    //   m/(1-0.9) = [0.5, -1], sqrt(v/(1-0.999)) = [0.5, 1];
    //   p -= 0.1 * [0.5/(0.5+1e-8), -1/(1+1e-8)] -> [0.899000002, -1.898000001].
    // Step 2, g = [0.1, 0.3], lr 0.05: m = [0.055, -0.06], v = [2.5975e-4, 1.089e-3];
    //   bias corrections 1-0.81 = 0.19 and 1-0.998001 = 0.001999;
    //   p = p*(1-0.0005) - 0.05/0.19 * m / (sqrt(v/0.001999) + 1e-8)
    //     -> [0.8583984541913259, -1.8756585717141132].
    let dev = Device::Cpu;
    let p = Var::from_tensor(&Tensor::new(&[1f32, -2.0], &dev).unwrap()).unwrap();
    let mut opt = AdamW::new(vec![p.clone()], AdamWConfig::default()).unwrap();
    assert_eq!(opt.config.weight_decay, 0.01);
    let g1 = Tensor::new(&[0.5f32, -1.0], &dev).unwrap();
    opt.step(&[Some(g1)], 0.1).unwrap();
    let v1 = vals(p.as_tensor());
    assert!(close(v1[0] as f64, 0.899000002, 1e-6), "{v1:?}");
    assert!(close(v1[1] as f64, -1.898000001, 1e-6), "{v1:?}");
    let g2 = Tensor::new(&[0.1f32, 0.3], &dev).unwrap();
    opt.step(&[Some(g2)], 0.05).unwrap();
    let v2 = vals(p.as_tensor());
    assert!(close(v2[0] as f64, 0.8583984541913259, 1e-6), "{v2:?}");
    assert!(close(v2[1] as f64, -1.8756585717141132, 1e-6), "{v2:?}");
    let m = vals(&opt.m[0]);
    let v = vals(&opt.v[0]);
    assert!(close(m[0] as f64, 0.055, 1e-6) && close(m[1] as f64, -0.06, 1e-6));
    assert!(close(v[0] as f64, 2.5975e-4, 1e-6) && close(v[1] as f64, 1.089e-3, 1e-6));
    assert_eq!(opt.step, 2);
}

#[test]
fn adamw_skips_parameters_without_gradient_and_rejects_f64_masters() {
    let dev = Device::Cpu;
    let p = Var::from_tensor(&Tensor::new(&[1f32, 2.0], &dev).unwrap()).unwrap();
    let mut opt = AdamW::new(vec![p.clone()], AdamWConfig::default()).unwrap();
    opt.step(&[None], 0.1).unwrap();
    assert_eq!(vals(p.as_tensor()), vec![1.0, 2.0]);
    let q = Var::from_tensor(&Tensor::new(&[1f64], &dev).unwrap()).unwrap();
    assert!(AdamW::new(vec![q], AdamWConfig::default()).is_err());
}

#[test]
fn clip_grad_norm_scales_to_max_norm_like_torch() {
    let dev = Device::Cpu;
    // Global norm of [3, 4] and [12] is 13; max 3 -> coef 3 / (13 + 1e-6).
    let mut g = vec![
        Some(Tensor::new(&[3f32, 4.0], &dev).unwrap()),
        None,
        Some(Tensor::new(&[12f32], &dev).unwrap()),
    ];
    let n = clip_grad_norm(&mut g, 3.0).unwrap();
    assert!(close(n, 13.0, 1e-12));
    let coef = 3.0 / (13.0 + 1e-6);
    let a = vals(g[0].as_ref().unwrap());
    let c = vals(g[2].as_ref().unwrap());
    assert!(close(a[0] as f64, 3.0 * coef, 1e-6) && close(a[1] as f64, 4.0 * coef, 1e-6));
    assert!(close(c[0] as f64, 12.0 * coef, 1e-6));
    // Below the limit nothing changes.
    let mut g = vec![Some(Tensor::new(&[0.3f32, 0.4], &dev).unwrap())];
    let n = clip_grad_norm(&mut g, 1.0).unwrap();
    assert!(close(n, 0.5, 1e-6));
    assert_eq!(vals(g[0].as_ref().unwrap()), vec![0.3, 0.4]);
}

#[test]
fn lr_schedules_follow_diffusers_formulas() {
    assert_eq!(
        LrSchedule::parse("constant", 5, 100).unwrap().factor(0),
        1.0
    );
    let w = LrSchedule::parse("constant_with_warmup", 4, 100).unwrap();
    let f: Vec<f64> = (0..6).map(|k| w.factor(k)).collect();
    assert_eq!(f, vec![0.0, 0.25, 0.5, 0.75, 1.0, 1.0]);
    // cosine, warmup 2, total 10: progress (k-2)/8, 0.5 (1 + cos(pi * progress)).
    let c = LrSchedule::parse("cosine", 2, 10).unwrap();
    let expect = [
        (0, 0.0),
        (1, 0.5),
        (2, 1.0),
        (4, 0.8535533905932737),
        (6, 0.5),
        (10, 0.0),
    ];
    for (k, e) in expect {
        assert!(
            close(c.factor(k), e, 1e-12),
            "k={k}: {} vs {e}",
            c.factor(k)
        );
    }
    assert!(LrSchedule::parse("linear-ish", 0, 1).is_err());
}

#[test]
fn accumulation_averages_micro_batches() {
    let dev = Device::Cpu;
    let mut acc = GradAccumulator::new();
    acc.add(vec![Some(Tensor::new(&[1f32, 2.0], &dev).unwrap()), None])
        .unwrap();
    acc.add(vec![
        Some(Tensor::new(&[3f32, 6.0], &dev).unwrap()),
        Some(Tensor::new(&[4f32], &dev).unwrap()),
    ])
    .unwrap();
    assert_eq!(acc.count(), 2);
    let g = acc.take().unwrap();
    assert_eq!(vals(g[0].as_ref().unwrap()), vec![2.0, 4.0]);
    assert_eq!(vals(g[1].as_ref().unwrap()), vec![2.0]);
    assert_eq!(acc.count(), 0);
    assert!(acc.take().is_err());
}

#[test]
fn fused_cpu_adamw_gives_the_same_bits_as_the_tensor_path() {
    let dev = Device::Cpu;
    let mut rng = selma_train::rng::TrainRng::new(5);
    let init = rng
        .randn((3, 37), 1.0, &dev, candle_core::DType::F32)
        .unwrap();
    let cfg = AdamWConfig {
        weight_decay: 0.05,
        ..AdamWConfig::default()
    };
    let pa = Var::from_tensor(&init).unwrap();
    let pb = Var::from_tensor(&init).unwrap();
    let mut a = AdamW::new(vec![pa.clone()], cfg).unwrap();
    let mut b = AdamW::new(vec![pb.clone()], cfg).unwrap();
    b.fused = false;
    let bits = |t: &Tensor| -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    };
    for (k, lr) in [1e-3, 3e-2, 7e-4, 1e-1, 2e-3].iter().enumerate() {
        let g = rng
            .randn((3, 37), 0.1 + k as f64, &dev, candle_core::DType::F32)
            .unwrap();
        a.step(&[Some(g.clone())], *lr).unwrap();
        b.step(&[Some(g)], *lr).unwrap();
        assert_eq!(bits(pa.as_tensor()), bits(pb.as_tensor()), "update {k}");
        assert_eq!(bits(&a.m[0]), bits(&b.m[0]));
        assert_eq!(bits(&a.v[0]), bits(&b.v[0]));
    }
    assert_ne!(bits(pa.as_tensor()), bits(&init));
}
