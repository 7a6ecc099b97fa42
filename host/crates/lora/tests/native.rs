//! selma_lora::native strategies against hand-computed values and each other.

use candle_core::{Device, Tensor};
use selma_lora::native::{self, Expert, Merged, Strategy};
use selma_lora::ops;
use selma_lora::rng::SplitMix64;

fn t(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
}

fn random(rows: usize, cols: usize, seed: u64) -> Tensor {
    let mut r = SplitMix64::new(seed);
    let v: Vec<f32> = (0..rows * cols)
        .map(|_| (r.next_f64() - 0.5) as f32)
        .collect();
    t(&v, &[rows, cols])
}

fn vals(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn close(a: &Tensor, b: &[f32], tol: f32) {
    let a = vals(a);
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol, "entry {i}: {x} vs {y}");
    }
}

/// Three experts of ranks 2, 3, 1 on a [5, 4] layer, with their reference
/// deltas computed by hand-written loops.
/// (up, down, scale) of one test expert.
type Factors = (Tensor, Tensor, f32);

fn experts() -> (Vec<Factors>, Vec<Vec<f32>>) {
    let mut out = Vec::new();
    let mut deltas = Vec::new();
    for (i, (r, scale)) in [(2, 0.5f32), (3, 1.0), (1, 2.0)].into_iter().enumerate() {
        let up = random(5, r, 10 + i as u64);
        let down = random(r, 4, 20 + i as u64);
        let (u, d) = (vals(&up), vals(&down));
        let mut delta = vec![0f32; 20];
        for a in 0..5 {
            for b in 0..4 {
                delta[a * 4 + b] = scale * (0..r).map(|k| u[a * r + k] * d[k * 4 + b]).sum::<f32>();
            }
        }
        out.push((up, down, scale));
        deltas.push(delta);
    }
    (out, deltas)
}

fn view<'a>(e: &'a [Factors], w: &[f32]) -> Vec<Expert<'a>> {
    e.iter()
        .zip(w)
        .map(|((up, down, scale), &weight)| Expert {
            up,
            down,
            scale: *scale,
            weight,
        })
        .collect()
}

#[test]
fn linear_cat_svd_agree_with_weighted_delta_sum() {
    let (e, deltas) = experts();
    let w = [0.2, 0.5, -0.3];
    let want: Vec<f32> = (0..20)
        .map(|j| (0..3).map(|i| w[i] * deltas[i][j]).sum())
        .collect();
    let ex = view(&e, &w);
    close(
        &native::linear(&ex).unwrap().to_delta().unwrap(),
        &want,
        1e-6,
    );
    let Merged::Factors { up, down } = native::cat(&ex).unwrap() else {
        panic!("cat returns factors")
    };
    assert_eq!((up.dims(), down.dims()), (&[5, 6][..], &[6, 4][..]));
    close(&up.matmul(&down).unwrap(), &want, 1e-6);
    // svd at full rank (4 = min(5, 4)) is exact
    close(
        &native::svd(&ex, Some(4)).unwrap().to_delta().unwrap(),
        &want,
        1e-5,
    );
    // default rank = max expert rank = 3: the best rank-3 approximation
    let got = native::svd(&ex, None).unwrap().to_delta().unwrap();
    let s = ops::singular_values(&t(&want, &[5, 4])).unwrap();
    let err: f64 = vals(&got)
        .iter()
        .zip(&want)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!((err - s[3]).abs() < 1e-5, "{err} vs {}", s[3]);
    close(
        &native::task_arithmetic(&ex, 2.0)
            .unwrap()
            .to_delta()
            .unwrap(),
        &want.iter().map(|x| 2.0 * x).collect::<Vec<_>>(),
        1e-6,
    );
}

#[test]
fn ties_hand_computed() {
    // Rank-1 experts with identity factors make the deltas easy to write:
    // up = column, down = row, scale 1.
    let e = vec![
        (t(&[1., -2., 3.], &[3, 1]), t(&[1., 1.], &[1, 2]), 1.0),
        (t(&[-4., 1., 1.], &[3, 1]), t(&[1., 0.5], &[1, 2]), 1.0),
    ];
    // deltas: A = [[1,1],[-2,-2],[3,3]], B = [[-4,-2],[1,0.5],[1,0.5]]
    // density 0.5 keeps 3 of 6: A -> [[0,0],[-2,-2],[3,3]] keeps 3,3,-2 (first -2);
    // recompute: |A| = 1,1,2,2,3,3 -> top 3 = 3,3 and the first 2 (index 2)
    //   A' = [[0,0],[-2,0],[3,3]]
    // |B| = 4,2,1,.5,1,.5 -> top 3 = 4, 2, then the first 1 (index 2)
    //   B' = [[-4,-2],[1,0],[0,0]]
    // elect: sums [-4,-2],[-1,0],[3,3] -> signs -,-,-,0,+,+
    // means: [-4,-2],[-2,0],[3,3]
    let ex = view(&e, &[0.5, 0.5]);
    let m = native::ties(&ex, 0.5, 1.0).unwrap().to_delta().unwrap();
    close(&m, &[-4., -2., -2., 0., 3., 3.], 1e-6);
    // unequal weights scale by w / mean(w): 1.5 and 0.5
    let ex = view(&e, &[0.75, 0.25]);
    let m = native::ties(&ex, 0.5, 2.0).unwrap().to_delta().unwrap();
    // A'' = 1.5 A' = [[0,0],[-3,0],[4.5,4.5]]; B'' = 0.5 B' = [[-2,-1],[0.5,0],[0,0]]
    // sums [-2,-1],[-2.5,0],[4.5,4.5] -> means [-2,-1],[-3,0],[4.5,4.5]; x2
    close(&m, &[-4., -2., -6., 0., 9., 9.], 1e-6);
}

#[test]
fn dare_drops_and_rescales_per_expert() {
    let (e, deltas) = experts();
    let w = [1.0, 0.0, 0.0];
    let ex = view(&e, &w);
    let m = native::dare(&ex, 0.5, &[7, 8, 9], true)
        .unwrap()
        .to_delta()
        .unwrap();
    let mut rng = SplitMix64::new(7);
    let want: Vec<f32> = deltas[0]
        .iter()
        .map(|x| if rng.next_f64() < 0.5 { 0.0 } else { 2.0 * x })
        .collect();
    close(&m, &want, 1e-6);
    // rate 0 is linear
    let w = [0.2, 0.3, 0.5];
    let ex = view(&e, &w);
    let a = native::dare(&ex, 0.0, &[1, 2, 3], true)
        .unwrap()
        .to_delta()
        .unwrap();
    let b = native::linear(&ex).unwrap().to_delta().unwrap();
    close(&a, &vals(&b), 1e-6);
}

#[test]
fn strategy_parse_and_dispatch() {
    let (e, deltas) = experts();
    let ex = view(&e, &[0.3, 0.3, 0.4]);
    let p = |k: &str, v: &str| (k.to_string(), v.to_string());
    let mut s = Strategy::parse("ties", &[p("density", "0.5")]).unwrap();
    let a = s.merge_layer("l", &ex, None).unwrap().to_delta().unwrap();
    let b = native::ties(&ex, 0.5, 1.0).unwrap().to_delta().unwrap();
    close(&a, &vals(&b), 0.0);
    assert!(Strategy::parse("ties", &[p("dnsity", "0.5")]).is_err());
    assert!(Strategy::parse("ties", &[p("density", "x")]).is_err());
    assert!(Strategy::parse("bogus", &[]).is_err());
    // linear: exact factors (rank 6 = 2 + 3 + 1) without a rank, a delta with one
    let mut s = Strategy::parse("task-arithmetic", &[p("lambda", "2")]).unwrap();
    let Merged::Factors { up, .. } = s.merge_layer("l", &ex, None).unwrap() else {
        panic!("factors expected")
    };
    assert_eq!(up.dims(), &[5, 6]);
    let d = s.merge_layer("l", &ex, Some(2)).unwrap();
    assert!(matches!(d, Merged::Delta(_)));
    let want: Vec<f32> = (0..20)
        .map(|j| 2.0 * (0.3 * deltas[0][j] + 0.3 * deltas[1][j] + 0.4 * deltas[2][j]))
        .collect();
    close(&d.to_delta().unwrap(), &want, 1e-6);
    // dare seeds depend on (seed, layer, expert), not on the call order
    let mut s = Strategy::parse("dare", &[p("seed", "3")]).unwrap();
    let a = vals(&s.merge_layer("x", &ex, None).unwrap().to_delta().unwrap());
    let b = vals(&s.merge_layer("y", &ex, None).unwrap().to_delta().unwrap());
    assert_ne!(a, b);
    let mut s2 = Strategy::parse("dare", &[p("seed", "3")]).unwrap();
    assert_eq!(
        a,
        vals(&s2.merge_layer("x", &ex, None).unwrap().to_delta().unwrap())
    );
    let seeds: Vec<u64> = (0..3).map(|i| native::layer_seed(3, "x", i)).collect();
    let c = native::dare(&ex, 0.5, &seeds, true)
        .unwrap()
        .to_delta()
        .unwrap();
    close(&c, &a, 0.0);
}

#[test]
fn layer_seed_reference_value() {
    // splitmix64(base ^ fnv1a64(layer) ^ (i + 1) * golden), computed by hand in
    // Python for base 0, layer "a", i 0:
    // fnv1a64("a") = 0xaf63dc4c8601ec8c
    let fnv_a: u64 = 0xaf63_dc4c_8601_ec8c;
    let x = fnv_a ^ 0x9E37_79B9_7F4A_7C15;
    assert_eq!(native::layer_seed(0, "a", 0), SplitMix64::new(x).next_u64());
}
