//! Scheduler maths against hand-computed diffusers formulas: timesteps for
//! each spacing, sigmas from an independently computed alphas_cumprod, single
//! DDIM / Euler steps by hand, and an oracle model (one that knows x0) that
//! every sampler must bring back to x0.

use candle_core::{Device, Tensor};
use selma_diffusion::scheduler::{
    self, config::karras_sigmas, BatchNoise, NoiseSource, SamplerOptions, SchedulerConfig,
    SchedulerKind,
};

const SD15: &str = r#"{
  "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
  "beta_start": 0.00085, "clip_sample": false, "num_train_timesteps": 1000,
  "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null
}"#;

fn sd15() -> SchedulerConfig {
    SchedulerConfig::from_json(SD15).unwrap()
}

fn with(extra: &str) -> SchedulerConfig {
    let mut v: serde_json::Value = serde_json::from_str(SD15).unwrap();
    let e: serde_json::Value = serde_json::from_str(extra).unwrap();
    for (k, x) in e.as_object().unwrap() {
        v[k] = x.clone();
    }
    SchedulerConfig::from_json(&v.to_string()).unwrap()
}

/// alphas_cumprod of the SD 1.5 schedule, computed here from the definition.
fn ac_sd15() -> Vec<f64> {
    let (a, b) = (0.00085f64.sqrt(), 0.012f64.sqrt());
    let mut acc = 1.0;
    (0..1000)
        .map(|i| {
            let s = a + (b - a) * i as f64 / 999.0;
            acc *= 1.0 - s * s;
            acc
        })
        .collect()
}

fn sigma(ac: f64) -> f64 {
    ((1.0 - ac) / ac).sqrt()
}

fn ts(kind: SchedulerKind, cfg: &SchedulerConfig, steps: usize) -> Vec<f64> {
    scheduler::build(kind, cfg, steps, SamplerOptions::default())
        .unwrap()
        .timesteps()
        .to_vec()
}

#[test]
fn ddim_leading_spacing_with_offset() {
    let t = ts(SchedulerKind::Ddim, &sd15(), 10);
    let want: Vec<f64> = (0..10).rev().map(|k| (k * 100 + 1) as f64).collect();
    assert_eq!(t, want);
    assert_eq!(t[0], 901.0);
    assert_eq!(t[9], 1.0);
    // 3 steps: ratio 1000 / 3 = 333 -> 666 + 1, 333 + 1, 0 + 1
    assert_eq!(ts(SchedulerKind::Ddim, &sd15(), 3), vec![667.0, 334.0, 1.0]);
}

#[test]
fn ddim_trailing_and_linspace_spacing() {
    let cfg = with(r#"{"timestep_spacing": "trailing"}"#);
    let want: Vec<f64> = (1..=10).rev().map(|k| (k * 100 - 1) as f64).collect();
    assert_eq!(ts(SchedulerKind::Ddim, &cfg, 10), want);
    // 1000/3 = 333.33: arange(1000, 0, -333.33) = 1000, 666.67, 333.33 -> round, -1
    assert_eq!(ts(SchedulerKind::Ddim, &cfg, 3), vec![999.0, 666.0, 332.0]);
    let cfg = with(r#"{"timestep_spacing": "linspace"}"#);
    // linspace(0, 999, 10) = 0, 111, ..., 999 (exact integers)
    let want: Vec<f64> = (0..10).rev().map(|k| (k * 111) as f64).collect();
    assert_eq!(ts(SchedulerKind::Ddim, &cfg, 10), want);
    // linspace(0, 999, 4) = 0, 333, 666, 999
    assert_eq!(
        ts(SchedulerKind::Ddim, &cfg, 4),
        vec![999.0, 666.0, 333.0, 0.0]
    );
}

#[test]
fn alphas_cumprod_and_sigmas_match_the_definition() {
    let ours = sd15().noise_schedule();
    let ac = ac_sd15();
    for &i in &[0usize, 1, 250, 500, 999] {
        assert!((ours.alphas_cumprod[i] - ac[i]).abs() < 1e-12, "ac[{i}]");
    }
    let s = ours.sigmas();
    // The well-known SD 1.x k-diffusion range.
    assert!((s[999] - 14.6146).abs() < 1e-3, "sigma_max {}", s[999]);
    assert!((s[0] - 0.0292).abs() < 1e-4, "sigma_min {}", s[0]);
    // linear and cosine schedules from their definitions
    let lin =
        with(r#"{"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}"#).betas();
    assert!((lin[0] - 0.0001).abs() < 1e-15 && (lin[999] - 0.02).abs() < 1e-15);
    assert!((lin[500] - (0.0001 + 0.0199 * 500.0 / 999.0)).abs() < 1e-15);
    let cos = with(r#"{"beta_schedule": "squaredcos_cap_v2"}"#).betas();
    let ab = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    assert!((cos[10] - (1.0 - ab(0.011) / ab(0.010))).abs() < 1e-12);
    assert_eq!(cos[999], 0.999);
}

#[test]
fn euler_timesteps_and_sigmas() {
    let ac = ac_sd15();
    // Euler's default spacing is linspace (un-rounded): 999, 832.5, ..., 0 for 7 steps.
    let cfg = with(r#"{"timestep_spacing": "linspace"}"#);
    let e = scheduler::euler::Euler::new(&cfg, 7, false).unwrap();
    let t = scheduler::Scheduler::timesteps(&e).to_vec();
    assert_eq!(t.len(), 7);
    assert!((t[0] - 999.0).abs() < 1e-9 && (t[1] - 832.5).abs() < 1e-9 && t[6].abs() < 1e-9);
    assert!((e.sigmas[0] - sigma(ac[999])).abs() < 1e-9);
    // interpolated between training timesteps 832 and 833
    let mid = 0.5 * (sigma(ac[832]) + sigma(ac[833]));
    assert!((e.sigmas[1] - mid).abs() < 1e-9);
    assert!((e.sigmas[6] - sigma(ac[0])).abs() < 1e-12);
    assert_eq!(*e.sigmas.last().unwrap(), 0.0);
    assert_eq!(e.sigmas.len(), 8);
    // linspace: init_noise_sigma = sigma_max
    assert!((scheduler::Scheduler::init_noise_sigma(&e) - sigma(ac[999])).abs() < 1e-9);

    // Without timestep_spacing in the file, Euler uses its own default (linspace).
    let e = scheduler::euler::Euler::new(&sd15(), 10, false).unwrap();
    assert_eq!(scheduler::Scheduler::timesteps(&e)[1], 888.0);
    // leading with offset: 901 ... 1 and init sigma sqrt(sigma_max^2 + 1)
    let leading = with(r#"{"timestep_spacing": "leading"}"#);
    let e = scheduler::euler::Euler::new(&leading, 10, false).unwrap();
    let want: Vec<f64> = (0..10).rev().map(|k| (k * 100 + 1) as f64).collect();
    assert_eq!(scheduler::Scheduler::timesteps(&e), &want[..]);
    for (i, &t) in want.iter().enumerate() {
        assert!((e.sigmas[i] - sigma(ac[t as usize])).abs() < 1e-9);
    }
    let s0 = sigma(ac[901]);
    assert!((scheduler::Scheduler::init_noise_sigma(&e) - (s0 * s0 + 1.0).sqrt()).abs() < 1e-9);

    // trailing: 999, 899, ..., 99
    let cfg = with(r#"{"timestep_spacing": "trailing"}"#);
    let e = scheduler::euler::Euler::new(&cfg, 10, false).unwrap();
    assert!((e.sigmas[9] - sigma(ac[99])).abs() < 1e-9);
}

#[test]
fn karras_sigmas_follow_the_rho_ramp() {
    let ac = ac_sd15();
    let (lo, hi) = (sigma(ac[0]), sigma(ac[999]));
    let s = karras_sigmas(lo, hi, 5);
    assert!((s[0] - hi).abs() < 1e-9 && (s[4] - lo).abs() < 1e-9);
    // sigma^(1/7) is linear in the step index
    let r: Vec<f64> = s.iter().map(|x| x.powf(1.0 / 7.0)).collect();
    for i in 1..4 {
        assert!(((r[i + 1] - r[i]) - (r[1] - r[0])).abs() < 1e-12);
    }
    // DPM++ with Karras: sigmas over the full training range, final 0,
    // timesteps are the rounded inverse of sigma.
    let d = scheduler::dpmpp_2m::DpmPp2M::new(&sd15(), 5, true).unwrap();
    for (ours, want) in d.sigmas.iter().zip(&s) {
        assert!((ours - want).abs() < 1e-9);
    }
    assert_eq!(d.sigmas[5], 0.0);
    let t = scheduler::Scheduler::timesteps(&d);
    assert_eq!(t[0], 999.0);
    assert_eq!(t[4], 0.0);
    // sigma_to_t inverts sigma exactly at training timesteps
    let ns = sd15().noise_schedule();
    assert!((ns.sigma_to_t(sigma(ac[400])) - 400.0).abs() < 1e-9);
}

#[test]
fn dpm_timesteps_per_spacing() {
    // linspace(0, 999, 11).round()[::-1][:-1]
    let cfg = with(r#"{"timestep_spacing": "linspace"}"#);
    let t = ts(SchedulerKind::DpmPp2M, &cfg, 10);
    assert_eq!(
        t,
        vec![999.0, 899.0, 799.0, 699.0, 599.0, 500.0, 400.0, 300.0, 200.0, 100.0]
    );
    // leading: ratio 1000 // 11 = 90 -> 900 ... 90, + offset
    let leading = with(r#"{"timestep_spacing": "leading"}"#);
    let t = ts(SchedulerKind::DpmPp2M, &leading, 10);
    assert_eq!(t[0], 901.0);
    assert_eq!(t[9], 91.0);
}

#[test]
fn one_ddim_and_one_euler_step_by_hand() {
    let ac = ac_sd15();
    let dev = Device::Cpu;
    let x = Tensor::new(&[1.0f32, -0.5], &dev).unwrap();
    let eps = Tensor::new(&[0.5f32, 0.25], &dev).unwrap();
    let mut noise = BatchNoise::from_seed(0, 2);
    let mut d =
        scheduler::build(SchedulerKind::Ddim, &sd15(), 10, SamplerOptions::default()).unwrap();
    let out = d
        .step(&eps, 0, &x, &mut noise)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let (a, p) = (ac[901], ac[801]);
    for (k, (xv, ev)) in [(1.0f64, 0.5f64), (-0.5, 0.25)].iter().enumerate() {
        let x0 = (xv - (1.0 - a).sqrt() * ev) / a.sqrt();
        let want = p.sqrt() * x0 + (1.0 - p).sqrt() * ev;
        assert!(
            (out[k] as f64 - want).abs() < 1e-5,
            "ddim {k}: {} vs {want}",
            out[k]
        );
    }
    // last step: prev timestep < 0 -> alphas_cumprod[0] (set_alpha_to_one false)
    let out = d
        .step(&eps, 9, &x, &mut noise)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let (a, p) = (ac[1], ac[0]);
    let x0 = (1.0 - (1.0 - a).sqrt() * 0.5) / a.sqrt();
    let want = p.sqrt() * x0 + (1.0 - p).sqrt() * 0.5;
    assert!((out[0] as f64 - want).abs() < 1e-5);

    let leading = with(r#"{"timestep_spacing": "leading"}"#);
    let mut e = scheduler::build(
        SchedulerKind::Euler,
        &leading,
        10,
        SamplerOptions::default(),
    )
    .unwrap();
    let out = e
        .step(&eps, 0, &x, &mut noise)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let (s0, s1) = (sigma(ac[901]), sigma(ac[801]));
    // x0 = x - s0*eps; d = (x - x0)/s0 = eps; x' = x + eps*(s1 - s0)
    let want = 1.0 + 0.5 * (s1 - s0);
    assert!((out[0] as f64 - want).abs() < 1e-5);
    let scaled = e
        .scale_model_input(&x, 0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!((scaled[0] as f64 - 1.0 / (s0 * s0 + 1.0).sqrt()).abs() < 1e-6);
}

/// An oracle model that knows x0 predicts the exact noise / velocity of the
/// current sample; every sampler must then land on x0.
fn oracle_run(kind: SchedulerKind, cfg: &SchedulerConfig, karras: bool) -> f32 {
    let dev = Device::Cpu;
    let x0 = Tensor::new(&[[0.3f32, -0.7, 0.1, 0.9]], &dev).unwrap();
    let eps0 = Tensor::new(&[[1.2f32, -0.4, 0.8, -1.5]], &dev).unwrap();
    let opts = SamplerOptions {
        eta: 0.0,
        karras: Some(karras),
    };
    let mut s = scheduler::build(kind, cfg, 12, opts).unwrap();
    let ac = cfg.noise_schedule().alphas_cumprod;
    let vp = matches!(kind, SchedulerKind::Ddim | SchedulerKind::DpmPp2M);
    // alpha (VP scale of x0) and noise std of the sample at step i
    let level = |s: &dyn scheduler::Scheduler, i: usize| -> (f64, f64) {
        let sig = s.sigma(i);
        let a = 1.0 / (sig * sig + 1.0);
        if matches!(kind, SchedulerKind::Ddim) {
            assert!((a - ac[s.timesteps()[i] as usize]).abs() < 1e-12);
        }
        if vp {
            (a.sqrt(), (1.0 - a).sqrt())
        } else {
            (1.0, ((1.0 - a) / a).sqrt())
        }
    };
    let (a, b) = level(&*s, 0);
    let mut x = ((&x0 * a).unwrap() + (&eps0 * b).unwrap()).unwrap();
    let mut noise = BatchNoise::from_seed(7, 1);
    for i in 0..s.timesteps().len() {
        let (a, b) = level(&*s, i);
        let eps = ((&x - (&x0 * a).unwrap()).unwrap() * (1.0 / b)).unwrap();
        let out = match cfg.prediction_type {
            scheduler::PredictionType::Epsilon => eps,
            _ => {
                // v = alpha_vp * eps - sigma_vp * x0
                let s2 = if vp { b * b / (a * a) } else { b * b };
                let (av, sv) = (1.0 / (s2 + 1.0).sqrt(), s2.sqrt() / (s2 + 1.0).sqrt());
                ((eps * av).unwrap() - (&x0 * sv).unwrap()).unwrap()
            }
        };
        x = s.step(&out, i, &x, &mut noise).unwrap();
    }
    (x - x0)
        .unwrap()
        .abs()
        .unwrap()
        .max_keepdim(1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0]
}

#[test]
fn oracle_model_is_recovered_by_every_sampler() {
    let eps = with(r#"{"set_alpha_to_one": true}"#);
    let v = with(
        r#"{"set_alpha_to_one": true, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}"#,
    );
    for cfg in [&eps, &v] {
        for (kind, karras) in [
            (SchedulerKind::Ddim, false),
            (SchedulerKind::Euler, false),
            (SchedulerKind::EulerAncestral, false),
            (SchedulerKind::DpmPp2M, false),
            (SchedulerKind::DpmPp2M, true),
        ] {
            let err = oracle_run(kind, cfg, karras);
            assert!(
                err < 1e-4,
                "{kind} karras={karras} {:?}: error {err}",
                cfg.prediction_type
            );
        }
    }
}

#[test]
fn add_noise_and_velocity_per_sample() {
    let dev = Device::Cpu;
    let ns = sd15().noise_schedule();
    let ac = ac_sd15();
    let x0 = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0], [-1.0, 0.5]], &dev).unwrap();
    let n = Tensor::new(&[[0.5f32, -0.5], [1.0, 0.0], [2.0, -2.0]], &dev).unwrap();
    let t = [0usize, 500, 999];
    let noisy = ns.add_noise(&x0, &n, &t).unwrap().to_vec2::<f32>().unwrap();
    let vel = ns
        .get_velocity(&x0, &n, &t)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let xv = x0.to_vec2::<f32>().unwrap();
    let nv = n.to_vec2::<f32>().unwrap();
    for b in 0..3 {
        let a = ac[t[b]];
        for j in 0..2 {
            let want = a.sqrt() * xv[b][j] as f64 + (1.0 - a).sqrt() * nv[b][j] as f64;
            assert!((noisy[b][j] as f64 - want).abs() < 1e-5);
            let want = a.sqrt() * nv[b][j] as f64 - (1.0 - a).sqrt() * xv[b][j] as f64;
            assert!((vel[b][j] as f64 - want).abs() < 1e-5);
        }
    }
    assert!(ns.add_noise(&x0, &n, &[0, 1]).is_err());
    assert!(ns.add_noise(&x0, &n, &[0, 1, 1000]).is_err());
}

#[test]
fn seeded_noise_is_reproducible_and_standard_normal() {
    use selma_diffusion::scheduler::GaussianRng;
    let a = GaussianRng::new(42).normal_vec(20000);
    let b = GaussianRng::new(42).normal_vec(20000);
    let c = GaussianRng::new(43).normal_vec(20000);
    assert_eq!(a, b);
    assert_ne!(a, c);
    let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
    let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
    assert!(
        mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
        "mean {mean} var {var}"
    );
    // batch element i of seed s equals a single image of seed s + i
    let like = Tensor::zeros((3, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    let batch = BatchNoise::from_seed(5, 3)
        .noise_like(&like)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let single = GaussianRng::new(7).normal_vec(4);
    assert_eq!(&batch[8..12], &single[..]);
}

#[test]
fn karras_from_config_or_flag() {
    let cfg = with(r#"{"use_karras_sigmas": true}"#);
    // the config's choice applies to samplers that support it ...
    let e = scheduler::euler::Euler::new(&cfg, 5, true).unwrap();
    let s = scheduler::build(SchedulerKind::Euler, &cfg, 5, SamplerOptions::default()).unwrap();
    assert_eq!(s.sigma(2), e.sigmas[2]);
    // ... and is ignored by those that do not; an explicit flag there is an error
    assert!(scheduler::build(SchedulerKind::Ddim, &cfg, 5, SamplerOptions::default()).is_ok());
    let flag = SamplerOptions {
        eta: 0.0,
        karras: Some(true),
    };
    let e = scheduler::build(SchedulerKind::Ddim, &sd15(), 5, flag)
        .err()
        .unwrap();
    assert!(e.to_string().contains("--karras"));
    assert!(scheduler::build(SchedulerKind::Ddim, &sd15(), 0, flag).is_err());
    assert!(scheduler::build(
        SchedulerKind::Euler,
        &sd15(),
        1001,
        SamplerOptions::default()
    )
    .is_err());
}
