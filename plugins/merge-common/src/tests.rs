//! The hand-computed cases of /work/notes/merge-cases.md, run through the
//! strategies with the native reference ops.

use crate::reference::{Mat, RefOps};
use crate::*;

const TOL: f32 = 1e-5;

fn assert_close(got: &Mat, want: &[&[f32]]) {
    let want = Mat::new(want);
    assert_eq!((got.rows, got.cols), (want.rows, want.cols), "shape");
    for (g, w) in got.data.iter().zip(&want.data) {
        assert!(
            (g - w).abs() < TOL,
            "got {:?}, want {:?}",
            got.data,
            want.data
        );
    }
}

fn product(m: Merged<Mat>) -> Mat {
    match m {
        Merged::Factors(u, d) => RefOps.matmul(&u, &d).unwrap(),
        Merged::Delta(d) => d,
    }
}

/// Case A: two rank-1 experts on a 2x2 layer.
struct CaseA {
    up1: Mat,
    down1: Mat,
    up2: Mat,
    down2: Mat,
}

impl CaseA {
    fn new() -> Self {
        CaseA {
            up1: Mat::new(&[&[1.0], &[2.0]]),
            down1: Mat::new(&[&[1.0, -1.0]]),
            up2: Mat::new(&[&[1.0], &[-1.0]]),
            down2: Mat::new(&[&[3.0, 1.0]]),
        }
    }
    /// E1 has alpha 2 / rank 1 (scale 2), E2 scale 1.
    fn experts(&self, w1: f32, w2: f32) -> Vec<Expert<'_, Mat>> {
        vec![
            Expert {
                up: &self.up1,
                down: &self.down1,
                scale: 2.0,
                weight: w1,
            },
            Expert {
                up: &self.up2,
                down: &self.down2,
                scale: 1.0,
                weight: w2,
            },
        ]
    }
}

#[test]
fn linear_returns_exact_concatenated_factors() {
    let c = CaseA::new();
    match linear(&RefOps, "l", &c.experts(0.5, 0.5), None, 1.0).unwrap() {
        Merged::Factors(up, down) => {
            assert_close(&up, &[&[1.0, 0.5], &[2.0, -0.5]]);
            assert_close(&down, &[&[1.0, -1.0], &[3.0, 1.0]]);
            let p = RefOps.matmul(&up, &down).unwrap();
            assert_close(&p, &[&[2.5, -0.5], &[0.5, -2.5]]);
            // Not factor averaging, which would give [[3,0],[3,0]].
            assert!((p.at(0, 0) - 3.0).abs() > 0.1);
        }
        other => panic!("expected factors, got {other:?}"),
    }
}

#[test]
fn linear_with_requested_rank_returns_dense_delta() {
    let c = CaseA::new();
    match linear(&RefOps, "l", &c.experts(0.5, 0.5), Some(1), 1.0).unwrap() {
        Merged::Delta(d) => assert_close(&d, &[&[2.5, -0.5], &[0.5, -2.5]]),
        other => panic!("expected a delta, got {other:?}"),
    }
}

#[test]
fn cat_ignores_requested_rank() {
    let c = CaseA::new();
    match cat(&RefOps, "l", &c.experts(0.5, 0.5)).unwrap() {
        Merged::Factors(up, down) => {
            assert_eq!((up.cols, down.rows), (2, 2));
            assert_close(
                &RefOps.matmul(&up, &down).unwrap(),
                &[&[2.5, -0.5], &[0.5, -2.5]],
            );
        }
        other => panic!("expected factors, got {other:?}"),
    }
}

#[test]
fn task_arithmetic_scales_by_lambda() {
    let c = CaseA::new();
    let m = linear(&RefOps, "l", &c.experts(1.0, 1.0), None, 1.0).unwrap();
    assert_close(&product(m), &[&[5.0, -1.0], &[1.0, -5.0]]);
    let m = linear(&RefOps, "l", &c.experts(1.0, 1.0), None, 0.5).unwrap();
    assert_close(&product(m), &[&[2.5, -0.5], &[0.5, -2.5]]);
}

#[test]
fn svd_rank_one_is_best_approximation() {
    let c = CaseA::new();
    match svd(&RefOps, "l", &c.experts(0.5, 0.5), 1, None).unwrap() {
        Merged::Factors(up, down) => {
            assert_eq!((up.rows, up.cols, down.rows, down.cols), (2, 1, 1, 2));
            let p = RefOps.matmul(&up, &down).unwrap();
            assert_close(&p, &[&[1.5, -1.5], &[1.5, -1.5]]);
            // sqrt split: both factors have norm sqrt(3).
            let nu: f32 = up.data.iter().map(|x| x * x).sum();
            assert!((nu - 3.0).abs() < TOL);
        }
        other => panic!("expected factors, got {other:?}"),
    }
    // Rank 2 (here from the requested rank) reproduces the sum exactly.
    let m = svd(&RefOps, "l", &c.experts(0.5, 0.5), 0, Some(2)).unwrap();
    assert_close(&product(m), &[&[2.5, -0.5], &[0.5, -2.5]]);
}

#[test]
fn svd_rank_precedence() {
    let c = CaseA::new();
    let e = c.experts(0.5, 0.5);
    assert_eq!(
        svd_rank(&RefOps, &e, 0, None).unwrap(),
        1,
        "max expert rank"
    );
    assert_eq!(svd_rank(&RefOps, &e, 0, Some(2)).unwrap(), 2, "requested");
    assert_eq!(svd_rank(&RefOps, &e, 1, Some(2)).unwrap(), 1, "param wins");
    assert_eq!(
        svd_rank(&RefOps, &e, 64, None).unwrap(),
        2,
        "clipped to min(out,in)"
    );
    assert!(svd_rank(&RefOps, &e, -1, None).is_err());
}

#[test]
fn ties_trims_elects_and_takes_disjoint_mean() {
    let c = CaseA::new();
    let m = ties(&RefOps, "l", &c.experts(0.5, 0.5), 0.5, 1.0).unwrap();
    assert_close(&product(m), &[&[3.0, 0.0], &[4.0, -4.0]]);
    let m = ties(&RefOps, "l", &c.experts(0.5, 0.5), 0.5, 0.5).unwrap();
    assert_close(&product(m), &[&[1.5, 0.0], &[2.0, -2.0]]);
    let m = ties(&RefOps, "l", &c.experts(0.5, 0.5), 1.0, 1.0).unwrap();
    assert_close(&product(m), &[&[2.5, -2.0], &[4.0, -2.5]]);
}

#[test]
fn ties_weights_are_relative() {
    let c = CaseA::new();
    // Same result for any uniform weights.
    let a = product(ties(&RefOps, "l", &c.experts(0.5, 0.5), 0.5, 1.0).unwrap());
    let b = product(ties(&RefOps, "l", &c.experts(3.0, 3.0), 0.5, 1.0).unwrap());
    assert_eq!(a, b);
    let m = ties(&RefOps, "l", &c.experts(0.75, 0.25), 0.5, 1.0).unwrap();
    assert_close(&product(m), &[&[1.5, 0.0], &[6.0, -6.0]]);
    let m = ties(&RefOps, "l", &c.experts(0.75, 0.25), 1.0, 1.0).unwrap();
    assert_close(&product(m), &[&[2.25, -3.0], &[6.0, -3.25]]);
    // Weighted election flips entry (1,0).
    let m = ties(&RefOps, "l", &c.experts(0.25, 0.75), 1.0, 1.0).unwrap();
    assert_close(&product(m), &[&[2.75, 1.5], &[-4.5, -1.75]]);
    assert!(ties(&RefOps, "l", &c.experts(0.5, -0.5), 0.5, 1.0).is_err());
}

#[test]
fn dare_without_drops_matches_linear_and_ties() {
    let c = CaseA::new();
    let e = c.experts(0.5, 0.5);
    let m = dare(&RefOps, "l", &e, 0.0, DareVariant::Linear, 1.0, |_| 7).unwrap();
    assert_close(&product(m), &[&[2.5, -0.5], &[0.5, -2.5]]);
    let m = dare(&RefOps, "l", &e, 0.0, DareVariant::Ties, 1.0, |_| 7).unwrap();
    assert_close(&product(m), &[&[2.5, -2.0], &[4.0, -2.5]]);
}

#[test]
fn dare_linear_entries_are_subset_sums_and_reproducible() {
    let c = CaseA::new();
    let e = c.experts(0.5, 0.5);
    let tau1 = [2.0f32, -2.0, 4.0, -4.0];
    let tau2 = [3.0f32, 1.0, -3.0, -1.0];
    let mut sum = [0.0f32; 4];
    let trials = 2000;
    for t in 0..trials {
        let seed = |i: usize| layer_seed(t, "down_blocks.0.attn1.to_q", i);
        let m = product(dare(&RefOps, "l", &e, 0.5, DareVariant::Linear, 1.0, seed).unwrap());
        let again = product(dare(&RefOps, "l", &e, 0.5, DareVariant::Linear, 1.0, seed).unwrap());
        assert_eq!(m, again, "same seed, same result");
        for k in 0..4 {
            let x = m.data[k];
            // 0.5 * (m1 * 2 tau1 + m2 * 2 tau2) with m_i in {0, 1}.
            let options = [0.0, tau1[k], tau2[k], tau1[k] + tau2[k]];
            assert!(
                options.iter().any(|o| (o - x).abs() < TOL),
                "entry {k} = {x}"
            );
            sum[k] += x;
        }
    }
    // Unbiased: the mean over seeds approaches the linear merge.
    let linear = [2.5f32, -0.5, 0.5, -2.5];
    for k in 0..4 {
        let mean = sum[k] / trials as f32;
        assert!((mean - linear[k]).abs() < 0.25, "entry {k}: mean {mean}");
    }
}

#[test]
fn layer_seeds_differ_by_layer_and_expert() {
    let a = layer_seed(1, "a", 0);
    assert_eq!(a, layer_seed(1, "a", 0));
    assert_ne!(a, layer_seed(1, "a", 1));
    assert_ne!(a, layer_seed(1, "b", 0));
    assert_ne!(a, layer_seed(2, "a", 0));
}

#[test]
fn case_b_different_ranks_concatenate() {
    let up_a = Mat::new(&[&[1.0], &[0.0], &[2.0]]);
    let down_a = Mat::new(&[&[1.0, 1.0]]);
    let up_b = Mat::new(&[&[1.0, 0.0], &[0.0, 1.0], &[1.0, 1.0]]);
    let down_b = Mat::new(&[&[1.0, 0.0], &[0.0, -1.0]]);
    let e = vec![
        Expert {
            up: &up_a,
            down: &down_a,
            scale: 1.0,
            weight: 0.5,
        },
        Expert {
            up: &up_b,
            down: &down_b,
            scale: 0.5,
            weight: 0.5,
        },
    ];
    match cat(&RefOps, "l", &e).unwrap() {
        Merged::Factors(up, down) => {
            assert_close(
                &up,
                &[&[0.5, 0.25, 0.0], &[0.0, 0.0, 0.25], &[1.0, 0.25, 0.25]],
            );
            assert_close(&down, &[&[1.0, 1.0], &[1.0, 0.0], &[0.0, -1.0]]);
            let p = RefOps.matmul(&up, &down).unwrap();
            assert_close(&p, &[&[0.75, 0.5], &[0.0, -0.25], &[1.25, 0.75]]);
        }
        other => panic!("expected factors, got {other:?}"),
    }
}

#[test]
fn case_s_reference_sign_elect_mean() {
    let a = Mat::new(&[&[2.0, -2.0, 0.0, 1.0]]);
    let b = Mat::new(&[&[-2.0, 3.0, 0.0, -5.0]]);
    let m = RefOps.sign_elect_mean(&[&a, &b]).unwrap();
    assert_close(&m, &[&[0.0, 3.0, 0.0, -5.0]]);
}

#[test]
fn bad_inputs_are_errors_naming_layer_or_param() {
    let none: Vec<Expert<'_, Mat>> = vec![];
    let e = linear(&RefOps, "unet.x.to_q", &none, None, 1.0).unwrap_err();
    assert!(e.contains("unet.x.to_q"), "{e}");
    assert!(check_density(0.0).unwrap_err().contains("density"));
    assert!(check_density(1.5).is_err());
    assert!(check_density(1.0).is_ok());
    assert!(check_drop_rate(1.0).unwrap_err().contains("drop_rate"));
    assert!(check_drop_rate(0.0).is_ok());
    assert!(DareVariant::parse("foo").unwrap_err().contains("variant"));
    // Mismatched shapes surface the host's error with the layer name.
    let c = CaseA::new();
    let wide = Mat::new(&[&[1.0, 2.0, 3.0]]);
    let e = vec![
        Expert {
            up: &c.up1,
            down: &c.down1,
            scale: 1.0,
            weight: 0.5,
        },
        Expert {
            up: &c.up2,
            down: &wide,
            scale: 1.0,
            weight: 0.5,
        },
    ];
    let err = cat(&RefOps, "unet.y", &e).unwrap_err();
    assert!(err.contains("unet.y") && err.contains("down"), "{err}");
}
