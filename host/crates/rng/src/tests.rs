//! Known answers for both generators and statistical checks of the bounded
//! draw and the shuffles.

use super::*;

#[test]
fn splitmix64_matches_the_reference_stream() {
    // Seed 0: the published first outputs of Vigna's splitmix64.c; seeds
    // 1234567 and 7: an independent Python implementation, and the values
    // the SDK, LoRA and ShapeWorld copies pinned before this crate.
    let mut r = SplitMix64::new(0);
    assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
    assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    assert_eq!(r.next_u64(), 0x06C4_5D18_8009_454F);
    let mut r = SplitMix64::new(1_234_567);
    assert_eq!(r.next_u64(), 6_457_827_717_110_365_317);
    assert_eq!(r.next_u64(), 3_203_168_211_198_807_973);
    assert_eq!(r.next_u64(), 9_817_491_932_198_370_423);
    let mut r = SplitMix64::new(7);
    assert_eq!(r.next_u64(), 0x63CB_E1E4_5932_0DD7);
    assert_eq!(r.next_u64(), 0x044C_3CD7_F43C_661C);
    assert_eq!(r.next_u64(), 0xE698_4080_BAB1_2A02);
    assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
    assert_eq!(splitmix64(7), 0x63CB_E1E4_5932_0DD7);
}

#[test]
fn xoshiro_matches_the_reference_stream_and_its_seeding() {
    // Computed by an independent Python implementation of xoshiro256++
    // seeded by four SplitMix64 outputs (the scheduler noise's seeding).
    let r = Xoshiro256pp::new(0);
    assert_eq!(
        r.state(),
        [
            0xE220_A839_7B1D_CDAF,
            0x6E78_9E6A_A1B9_65F4,
            0x06C4_5D18_8009_454F,
            0xF88B_B8A8_724C_81EC
        ]
    );
    let mut r = r;
    let got: Vec<u64> = (0..4).map(|_| r.next_u64()).collect();
    assert_eq!(
        got,
        [
            0x5317_5D61_490B_23DF,
            0x61DA_6F3D_C380_D507,
            0x5C0F_DF91_EC9A_7BFC,
            0x02EE_BF8C_3BBE_5E1A
        ]
    );
    let mut r = Xoshiro256pp::new(42);
    let got: Vec<u64> = (0..4).map(|_| r.next_u64()).collect();
    assert_eq!(
        got,
        [
            0xD076_4D4F_4476_689F,
            0x519E_4174_576F_3791,
            0xFBE0_7CFB_0C24_ED8C,
            0xB37D_9F60_0CD8_35B8
        ]
    );
    // The state round-trips: a generator rebuilt from it continues the stream.
    let mut a = Xoshiro256pp::new(5);
    a.next_u64();
    let mut b = Xoshiro256pp::from_state(a.state());
    assert!((0..100).all(|_| a.next_u64() == b.next_u64()));
}

#[test]
fn normals_match_the_reference_box_muller() {
    // Seed 42, Box-Muller on open-interval uniforms (cos first, then sin),
    // computed in Python with the same libm.
    let mut r = Xoshiro256pp::new(42);
    let mut n = Normal::default();
    let got: Vec<u64> = (0..4).map(|_| n.sample(&mut r).to_bits()).collect();
    assert_eq!(
        got,
        [
            0xBFD1_30DC_F6D3_7971,
            0x3FE2_9F81_C15F_089D,
            0xBFAB_E277_2EF7_A726,
            0xBFC5_FCD4_0D06_4F18
        ]
    );
}

#[test]
fn uniforms_stay_in_their_intervals() {
    let mut r = SplitMix64::new(7);
    for _ in 0..10_000 {
        assert!((0.0..1.0).contains(&r.next_f64()));
        let u = r.next_f64_positive();
        assert!(u > 0.0 && u < 1.0);
    }
    // The extremes of a draw map inside the intervals.
    struct Fixed(u64);
    impl Rng for Fixed {
        fn next_u64(&mut self) -> u64 {
            self.0
        }
    }
    assert_eq!(Fixed(0).next_f64(), 0.0);
    assert!(Fixed(u64::MAX).next_f64() < 1.0);
    assert_eq!(Fixed(0).next_f64_positive(), 0.5 / (1u64 << 53) as f64);
    // 2^53 - 1/2 is not representable: the top draw rounds to exactly 1.
    assert_eq!(Fixed(u64::MAX).next_f64_positive(), 1.0);
    assert!(Fixed(u64::MAX - (1 << 11)).next_f64_positive() < 1.0);
    assert!(Fixed(u64::MAX).coin() && !Fixed(0).coin());
}

/// Pearson's chi-square statistic of `counts` against equal expectations.
fn chi_square(counts: &[u64]) -> f64 {
    let total: u64 = counts.iter().sum();
    let e = total as f64 / counts.len() as f64;
    counts.iter().map(|&c| (c as f64 - e).powi(2) / e).sum()
}

#[test]
fn below_covers_its_range_uniformly() {
    let mut r = SplitMix64::new(7);
    let mut seen = [0u64; 7];
    for _ in 0..70_000 {
        let x = r.below(7);
        assert!(x < 7);
        seen[x as usize] += 1;
    }
    // 6 degrees of freedom: P(chi2 > 22.46) = 0.001.
    let chi = chi_square(&seen);
    assert!(chi < 22.46, "chi2 {chi} for {seen:?}");
    assert!((0..1000).all(|_| r.below(1) == 0));
    assert!((0..1000).all(|_| r.below(u64::MAX) < u64::MAX));
}

#[test]
fn below_is_unbiased_where_modulo_and_multiply_shift_are_not() {
    // n = 3 * 2^62: plain `x % n` hits 0..2^62 twice as often (P = 1/2),
    // multiply-shift `(x * n) >> 64` hits multiples of 3 with P = 1/2; an
    // unbiased draw gives 1/3 to both.
    let n = 3u64 << 62;
    let mut r = Xoshiro256pp::new(1);
    let draws = 30_000;
    let (mut low, mut mult3) = (0u32, 0u32);
    for _ in 0..draws {
        let x = r.below(n);
        assert!(x < n);
        low += (x < 1 << 62) as u32;
        mult3 += x.is_multiple_of(3) as u32;
    }
    // sd of a share at p = 1/3 over 30000 draws is 0.0027.
    for share in [low, mult3].map(|c| c as f64 / draws as f64) {
        assert!((share - 1.0 / 3.0).abs() < 0.015, "{share}");
    }
    // The same checks do catch the biased reductions.
    let mut r = Xoshiro256pp::new(1);
    let modulo = (0..draws).filter(|_| r.next_u64() % n < 1 << 62).count();
    assert!((modulo as f64 / draws as f64 - 0.5).abs() < 0.015);
    let mut r = Xoshiro256pp::new(1);
    let shift = (0..draws)
        .filter(|_| (((r.next_u64() as u128 * n as u128) >> 64) as u64).is_multiple_of(3))
        .count();
    assert!((shift as f64 / draws as f64 - 0.5).abs() < 0.015);
}

#[test]
#[should_panic(expected = "below(0)")]
fn below_zero_panics() {
    SplitMix64::new(0).below(0);
}

#[test]
fn shuffle_is_a_permutation_uniform_over_the_orders_of_three() {
    let mut v: Vec<u32> = (0..50).collect();
    shuffle(&mut v, &mut SplitMix64::new(9));
    assert_ne!(v, (0..50).collect::<Vec<_>>());
    v.sort();
    assert_eq!(v, (0..50).collect::<Vec<_>>());
    let mut r = SplitMix64::new(3);
    let orders = [
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    ];
    let mut counts = [0u64; 6];
    for _ in 0..60_000 {
        let mut v = [0, 1, 2];
        shuffle(&mut v, &mut r);
        counts[orders.iter().position(|o| *o == v).unwrap()] += 1;
    }
    // 5 degrees of freedom: P(chi2 > 20.52) = 0.001.
    let chi = chi_square(&counts);
    assert!(chi < 20.52, "chi2 {chi} for {counts:?}");
    let mut p = permutation(100, &mut r);
    p.sort();
    assert_eq!(p, (0..100).collect::<Vec<_>>());
    shuffle(&mut [0u8; 0], &mut r);
    shuffle(&mut [1u8], &mut r);
}

#[test]
fn sample_k_draws_distinct_indices_uniformly() {
    let mut r = SplitMix64::new(42);
    let s = sample_k(10, 3, &mut r);
    assert_eq!(s.len(), 3);
    let mut d = s.clone();
    d.sort();
    d.dedup();
    assert_eq!(d.len(), 3);
    assert!(s.iter().all(|&i| i < 10));
    assert_eq!(sample_k(10, 3, &mut SplitMix64::new(42)), s);
    let mut all = sample_k(4, 9, &mut r);
    all.sort();
    assert_eq!(all, vec![0, 1, 2, 3]);
    assert!(sample_k(0, 3, &mut r).is_empty());
    // Each of the 20 ordered pairs of 5 is equally likely.
    let mut counts = [0u64; 25];
    for _ in 0..40_000 {
        let p = sample_k(5, 2, &mut r);
        counts[p[0] * 5 + p[1]] += 1;
    }
    let pairs: Vec<u64> = (0..25)
        .filter(|i| i / 5 != i % 5)
        .map(|i| counts[i])
        .collect();
    assert!((0..5).all(|i| counts[i * 5 + i] == 0));
    // 19 degrees of freedom: P(chi2 > 43.82) = 0.001.
    let chi = chi_square(&pairs);
    assert!(chi < 43.82, "chi2 {chi} for {pairs:?}");
}

#[test]
fn pick_and_the_reference_impl_forward() {
    let mut r = SplitMix64::new(1);
    let items = ['a', 'b', 'c'];
    let mut seen = [false; 3];
    for _ in 0..100 {
        let c = r.pick(&items);
        seen[items.iter().position(|&x| x == c).unwrap()] = true;
    }
    assert!(seen.iter().all(|&s| s));
    let (mut a, mut b) = (SplitMix64::new(4), SplitMix64::new(4));
    let by_ref: &mut SplitMix64 = &mut b;
    assert_eq!(
        Rng::below(&mut a, 1000),
        Rng::below(&mut &mut *by_ref, 1000)
    );
}
