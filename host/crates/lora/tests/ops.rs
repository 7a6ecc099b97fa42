//! selma_lora::ops on small hand-computed cases and against independent
//! computations.

use candle_core::{Device, Tensor};
use selma_lora::ops;
use selma_lora::rng::SplitMix64;

fn t(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
}

fn vals(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn random(rows: usize, cols: usize, seed: u64) -> Tensor {
    let mut r = SplitMix64::new(seed);
    let v: Vec<f32> = (0..rows * cols)
        .map(|_| (r.next_f64() * 2.0 - 1.0) as f32)
        .collect();
    t(&v, &[rows, cols])
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn weighted_sum_hand_computed() {
    let a = t(&[1., 2., 3., 4.], &[2, 2]);
    let b = t(&[10., 20., 30., 40.], &[2, 2]);
    let s = ops::weighted_sum(&[&a, &b], &[0.5, -0.1]).unwrap();
    assert_eq!(s.dims(), &[2, 2]);
    assert!(max_abs_diff(&vals(&s), &[-0.5, -1.0, -1.5, -2.0]) < 1e-6);
    assert!(ops::weighted_sum(&[&a], &[1.0, 2.0]).is_err());
    assert!(ops::weighted_sum(&[&a, &t(&[1., 2.], &[2])], &[1.0, 1.0]).is_err());
}

#[test]
fn magnitude_prune_keeps_top_k() {
    let x = t(&[3., -1., 4., -1., 5., -9., 2., 6.], &[2, 4]);
    let p = ops::magnitude_prune(&x, 0.5).unwrap();
    assert_eq!(p.dims(), &[2, 4]);
    assert_eq!(vals(&p), vec![0., 0., 4., 0., 5., -9., 0., 6.]);
    // density 1 keeps everything; tiny density keeps at least one entry.
    assert_eq!(vals(&ops::magnitude_prune(&x, 1.0).unwrap()), vals(&x));
    assert_eq!(
        vals(&ops::magnitude_prune(&x, 0.01).unwrap()),
        vec![0., 0., 0., 0., 0., -9., 0., 0.]
    );
    assert!(ops::magnitude_prune(&x, 0.0).is_err());
    assert!(ops::magnitude_prune(&x, 1.5).is_err());
}

#[test]
fn magnitude_prune_ties_keep_lowest_index() {
    let x = t(&[1., -1., 1., -1., 2.], &[5]);
    assert_eq!(
        vals(&ops::magnitude_prune(&x, 0.4).unwrap()),
        vec![1., 0., 0., 0., 2.]
    );
    assert_eq!(
        vals(&ops::magnitude_prune(&x, 0.6).unwrap()),
        vec![1., -1., 0., 0., 2.]
    );
    // round(0.5 * 5) = 3 (half away from zero)
    assert_eq!(ops::kept_count(5, 0.5), 3);
    assert_eq!(ops::kept_count(10, 0.2), 2);
}

#[test]
fn sign_elect_mean_hand_computed() {
    let a = t(&[1., -2., 0., 3., 0., 1.], &[6]);
    let b = t(&[2., 1., 0., -4., 0., -1.], &[6]);
    let c = t(&[-1., 3., 5., 0., 0., 0.], &[6]);
    let m = ops::sign_elect_mean(&[&a, &b, &c]).unwrap();
    // entry 0: sum 2 -> +, mean(1, 2); entry 1: sum 2 -> +, mean(1, 3);
    // entry 2: only 5; entry 3: sum -1 -> -, only -4; entry 4: all zero;
    // entry 5: sum 0 -> 0.
    assert!(max_abs_diff(&vals(&m), &[1.5, 2.0, 5.0, -4.0, 0.0, 0.0]) < 1e-6);
}

#[test]
fn random_drop_is_seeded_and_rescales() {
    let n = 20_000;
    let x = t(&vec![2.0; n], &[100, 200]);
    let rate = 0.3;
    let a = vals(&ops::random_drop(&x, rate, 42, true).unwrap());
    let b = vals(&ops::random_drop(&x, rate, 42, true).unwrap());
    let c = vals(&ops::random_drop(&x, rate, 43, true).unwrap());
    assert_eq!(a, b, "same seed, same mask");
    assert_ne!(a, c, "another seed, another mask");
    // The mask is one SplitMix64 draw per entry, in order: u < rate drops.
    let mut rng = SplitMix64::new(42);
    for (i, v) in a.iter().enumerate() {
        let dropped = rng.next_f64() < rate as f64;
        let want = if dropped { 0.0 } else { 2.0 / (1.0 - rate) };
        assert!((v - want).abs() < 1e-5, "entry {i}: {v} vs {want}");
    }
    let dropped = a.iter().filter(|v| **v == 0.0).count() as f64 / n as f64;
    assert!(
        (dropped - rate as f64).abs() < 0.02,
        "dropped fraction {dropped}"
    );
    // Expectation is preserved by the rescale (law of large numbers).
    let mean = a.iter().map(|v| *v as f64).sum::<f64>() / n as f64;
    assert!((mean - 2.0).abs() < 0.05, "mean {mean}");
    // Without rescale the kept entries are unchanged.
    let d = vals(&ops::random_drop(&x, rate, 42, false).unwrap());
    assert!(d.iter().all(|v| *v == 0.0 || *v == 2.0));
    assert_eq!(
        d.iter().map(|v| *v == 0.0).collect::<Vec<_>>(),
        a.iter().map(|v| *v == 0.0).collect::<Vec<_>>()
    );
    assert!(ops::random_drop(&x, 1.0, 0, true).is_err());
    assert_eq!(vals(&ops::random_drop(&x, 0.0, 0, true).unwrap()), vals(&x));
}

#[test]
fn concat_rows_and_columns() {
    let a = t(&[1., 2., 3., 4.], &[2, 2]);
    let b = t(&[5., 6.], &[2, 1]);
    let c = ops::concat(&[&a, &b], 1).unwrap();
    assert_eq!(c.dims(), &[2, 3]);
    assert_eq!(vals(&c), vec![1., 2., 5., 3., 4., 6.]);
    let d = ops::concat(&[&a, &t(&[7., 8.], &[1, 2])], 0).unwrap();
    assert_eq!(vals(&d), vec![1., 2., 3., 4., 7., 8.]);
    assert!(ops::concat(&[&a, &b], 0).is_err());
}

#[test]
fn svd_full_rank_reproduces_matrix() {
    for (m, n) in [(7, 5), (5, 7), (6, 6)] {
        let a = random(m, n, (m * 10 + n) as u64);
        let (up, down) = ops::svd_factors(&a, m.min(n)).unwrap();
        assert_eq!(up.dims(), &[m, m.min(n)]);
        assert_eq!(down.dims(), &[m.min(n), n]);
        let r = up.matmul(&down).unwrap();
        assert!(max_abs_diff(&vals(&r), &vals(&a)) < 1e-5);
        // asking for more than min(m, n) clamps
        let (up2, _) = ops::svd_factors(&a, 100).unwrap();
        assert_eq!(up2.dims()[1], m.min(n));
    }
}

/// Orthonormal columns by modified Gram-Schmidt (f64), independent of faer.
fn orthonormal(rows: usize, cols: usize, seed: u64) -> Vec<Vec<f64>> {
    let mut rng = SplitMix64::new(seed);
    let mut q: Vec<Vec<f64>> = Vec::new();
    while q.len() < cols {
        let mut v: Vec<f64> = (0..rows).map(|_| rng.next_f64() - 0.5).collect();
        for u in &q {
            let d: f64 = v.iter().zip(u).map(|(a, b)| a * b).sum();
            v.iter_mut().zip(u).for_each(|(a, b)| *a -= d * b);
        }
        let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt();
        v.iter_mut().for_each(|a| *a /= norm);
        q.push(v);
    }
    q
}

#[test]
fn svd_truncation_is_the_best_rank_r_approximation() {
    // A = U diag(s) V^T with known U, V, s; the best rank-r approximation is
    // the first r terms (Eckart-Young), its Frobenius error sqrt(sum s_j^2, j >= r).
    let (m, n) = (9, 6);
    let s = [5.0, 3.0, 2.0, 1.0, 0.5, 0.25];
    let u = orthonormal(m, n, 1);
    let v = orthonormal(n, n, 2);
    let build = |r: usize| -> Vec<f32> {
        let mut a = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                a[i * n + j] = (0..r).map(|k| u[k][i] * s[k] * v[k][j]).sum::<f64>() as f32;
            }
        }
        a
    };
    let a = t(&build(n), &[m, n]);
    let sv = ops::singular_values(&a).unwrap();
    assert!(
        max_abs_diff(
            &sv.iter().map(|x| *x as f32).collect::<Vec<_>>(),
            &s.map(|x| x as f32)
        ) < 1e-5
    );
    for r in 1..n {
        let (up, down) = ops::svd_factors(&a, r).unwrap();
        let approx = vals(&up.matmul(&down).unwrap());
        let err = approx
            .iter()
            .zip(vals(&a))
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let want = s[r..].iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((err - want).abs() < 1e-5, "rank {r}: error {err} vs {want}");
        assert!(
            max_abs_diff(&approx, &build(r)) < 1e-5,
            "rank {r}: not the known best approximation"
        );
        // singular values split evenly: up^T up == down down^T == diag(s_r)
        let gu = vals(&up.t().unwrap().matmul(&up).unwrap());
        let gd = vals(&down.matmul(&down.t().unwrap()).unwrap());
        assert!(max_abs_diff(&gu, &gd) < 1e-5);
    }
}

#[test]
fn svd_rejects_bad_input() {
    assert!(ops::svd_factors(&t(&[1., 2., 3.], &[3]), 1).is_err());
    assert!(ops::svd_factors(&t(&[1., f32::NAN, 3., 4.], &[2, 2]), 1).is_err());
}
