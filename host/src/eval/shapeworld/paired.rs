//! Paired comparison of two model variants scored on the same prompts and
//! noise: the change in pass rate with a cluster bootstrap 95% interval
//! (prompts are the clusters; fixed seed) and the exact McNemar test on the
//! discordant pairs.

use selma_rng::SplitMix64;
use serde::{Deserialize, Serialize};

/// Two-sided exact McNemar p-value: `b` pairs only the first variant passed,
/// `c` pairs only the second; `min(1, 2 P(X <= min(b, c)))` for X ~ Bin(b + c, 1/2).
pub fn mcnemar_exact(b: usize, c: usize) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    // Binomial(n, 1/2) pmf in log space (no underflow for large n).
    let mut log_pmf = n as f64 * 0.5f64.ln();
    let mut tail = 0.0;
    for i in 0..=k {
        tail += log_pmf.exp();
        log_pmf += ((n - i) as f64 / (i + 1) as f64).ln();
    }
    (2.0 * tail).min(1.0)
}

/// The paired change of a variant against the base on one set of samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairedDiff {
    /// Number of paired samples.
    pub n: usize,
    /// Mean of (variant - base) over the samples.
    pub diff: f64,
    /// Bootstrap 95% interval of `diff` (percentile, prompts resampled).
    pub lo: f64,
    /// Upper end of the interval.
    pub hi: f64,
    /// Samples where only the variant passed.
    pub better: usize,
    /// Samples where only the base passed.
    pub worse: usize,
    /// Exact McNemar p-value of better vs worse.
    pub p_mcnemar: f64,
}

/// Bootstrap resamples of the paired mean difference: each resample draws
/// the clusters (e.g. prompts, each carrying its samples under every noise
/// seed) with replacement and returns sum(d) / count over the drawn samples.
/// `d[i]` is sample i's difference and `cluster[i]` its cluster id.
pub fn bootstrap_diffs(d: &[f64], cluster: &[usize], resamples: usize, seed: u64) -> Vec<f64> {
    assert_eq!(d.len(), cluster.len(), "one cluster id per difference");
    let mut ids: Vec<usize> = cluster.to_vec();
    ids.sort_unstable();
    ids.dedup();
    // Per cluster: (sum of differences, number of samples).
    let mut sums = vec![(0.0f64, 0usize); ids.len()];
    for (x, c) in d.iter().zip(cluster) {
        let j = ids.binary_search(c).expect("cluster id collected above");
        sums[j].0 += x;
        sums[j].1 += 1;
    }
    let k = sums.len() as u64;
    let mut rng = SplitMix64::new(seed);
    (0..resamples)
        .map(|_| {
            if k == 0 {
                return f64::NAN;
            }
            let (mut s, mut n) = (0.0, 0usize);
            for _ in 0..k {
                let (cs, cn) = sums[rng.below(k) as usize];
                s += cs;
                n += cn;
            }
            s / n as f64
        })
        .collect()
}

/// The `q`-quantile of sorted values, linear between order statistics.
pub fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let i = pos.floor() as usize;
    let j = (i + 1).min(sorted.len() - 1);
    let f = pos - i as f64;
    sorted[i] * (1.0 - f) + sorted[j] * f
}

/// Paired change of `variant` against `base` (pass = 1, fail = 0, same
/// sample order), bootstrap over `cluster` ids with `resamples` draws
/// seeded `seed`, and McNemar's exact test.
pub fn paired_diff(
    base: &[bool],
    variant: &[bool],
    cluster: &[usize],
    resamples: usize,
    seed: u64,
) -> PairedDiff {
    assert_eq!(base.len(), variant.len(), "paired samples");
    let n = base.len();
    let d: Vec<f64> = base
        .iter()
        .zip(variant)
        .map(|(&b, &v)| v as u8 as f64 - b as u8 as f64)
        .collect();
    let better = base.iter().zip(variant).filter(|(&b, &v)| v && !b).count();
    let worse = base.iter().zip(variant).filter(|(&b, &v)| b && !v).count();
    let diff = if n == 0 {
        f64::NAN
    } else {
        d.iter().sum::<f64>() / n as f64
    };
    let mut boot = bootstrap_diffs(&d, cluster, resamples, seed);
    boot.sort_by(|a, b| a.total_cmp(b));
    PairedDiff {
        n,
        diff,
        lo: quantile_sorted(&boot, 0.025),
        hi: quantile_sorted(&boot, 0.975),
        better,
        worse,
        p_mcnemar: mcnemar_exact(worse, better),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mcnemar_matches_hand_computed_binomial_tails() {
        // n = 5, k = 0: 2 * (1/32).
        assert_eq!(mcnemar_exact(0, 5), 0.0625);
        assert_eq!(mcnemar_exact(5, 0), 0.0625);
        // n = 10, k = 1: 2 * (1 + 10) / 1024.
        assert!((mcnemar_exact(1, 9) - 22.0 / 1024.0).abs() < 1e-15);
        // n = 12, k = 2: 2 * (1 + 12 + 66) / 4096.
        assert!((mcnemar_exact(10, 2) - 158.0 / 4096.0).abs() < 1e-15);
        // Balanced or empty: no evidence.
        assert_eq!(mcnemar_exact(3, 3), 1.0);
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        // n = 1: 2 * 1/2.
        assert_eq!(mcnemar_exact(1, 0), 1.0);
        // Large n without overflow: 2 * 2^-1000 (a subnormal-free 1.9e-301).
        let p = mcnemar_exact(0, 1000);
        assert!((p / 2f64.powi(-999) - 1.0).abs() < 1e-9, "{p}");
        // n = 1000, k = 480, reference value from exact integer binomials
        // (Python: 2 * sum(comb(1000, i) for i in range(481)) / 2**1000).
        let p = mcnemar_exact(480, 520);
        assert!((p - 0.217_448_293_204_140_94).abs() < 1e-10, "{p}");
        // 27 better, 4 worse (SHAPEWORLD.md's head-to-head): p < .001.
        // Hand value: 2 * sum_{i<=4} C(31, i) / 2^31 = 2 * 36457 / 2^31.
        let want = 2.0 * (1.0 + 31.0 + 465.0 + 4495.0 + 31465.0) / 2f64.powi(31);
        assert!((mcnemar_exact(4, 27) - want).abs() < 1e-15);
    }

    #[test]
    fn quantiles_interpolate_between_order_statistics() {
        let v = [0.0, 1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile_sorted(&v, 0.0), 0.0);
        assert_eq!(quantile_sorted(&v, 1.0), 4.0);
        assert_eq!(quantile_sorted(&v, 0.5), 2.0);
        assert!((quantile_sorted(&v, 0.125) - 0.5).abs() < 1e-12);
        assert!(quantile_sorted(&[], 0.5).is_nan());
    }

    #[test]
    fn bootstrap_of_two_clusters_follows_the_exact_resampling_distribution() {
        // Clusters {d = 0} and {d = 1}: a resample of two draws has mean 0,
        // 1/2 or 1 with probabilities 1/4, 1/2, 1/4.
        let boot = bootstrap_diffs(&[0.0, 1.0], &[0, 1], 20_000, 7);
        let frac = |x: f64| boot.iter().filter(|&&b| b == x).count() as f64 / boot.len() as f64;
        assert!((frac(0.0) - 0.25).abs() < 0.015, "{}", frac(0.0));
        assert!((frac(0.5) - 0.5).abs() < 0.015, "{}", frac(0.5));
        assert!((frac(1.0) - 0.25).abs() < 0.015, "{}", frac(1.0));
        // Same seed, same draws; the seed matters.
        assert_eq!(boot, bootstrap_diffs(&[0.0, 1.0], &[0, 1], 20_000, 7));
        assert_ne!(boot, bootstrap_diffs(&[0.0, 1.0], &[0, 1], 20_000, 8));
    }

    #[test]
    fn bootstrap_keeps_a_cluster_s_samples_together() {
        // One cluster with d = {1, 1} and one with d = {-1, -1, -1, -1}
        // (unequal sizes): a resample is {A, A} -> 1, {B, B} -> -1, or one
        // of each -> (2 - 4) / 6 = -1/3; nothing else is possible.
        let d = [1.0, 1.0, -1.0, -1.0, -1.0, -1.0];
        let c = [5, 5, 9, 9, 9, 9];
        for b in bootstrap_diffs(&d, &c, 2000, 1) {
            assert!(
                b == 1.0 || b == -1.0 || (b + 1.0 / 3.0).abs() < 1e-12,
                "{b}"
            );
        }
    }

    #[test]
    fn paired_diff_counts_discordant_pairs() {
        // 10 samples, 5 prompts x 2 seeds: variant fixes 3, breaks 1.
        let base = [
            true, false, false, false, true, true, false, false, true, true,
        ];
        let var = [
            true, true, true, true, false, true, false, false, true, true,
        ];
        let cl = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4];
        let p = paired_diff(&base, &var, &cl, 4000, 1);
        assert_eq!((p.n, p.better, p.worse), (10, 3, 1));
        assert!((p.diff - 0.2).abs() < 1e-12);
        assert_eq!(p.p_mcnemar, mcnemar_exact(1, 3));
        assert!((2.0 * (1.0 + 4.0) / 16.0 - p.p_mcnemar).abs() < 1e-15);
        assert!(p.lo <= p.diff && p.diff <= p.hi, "{p:?}");
        // Identical verdicts: a zero difference with a zero-width interval.
        let z = paired_diff(&base, &base, &cl, 1000, 1);
        assert_eq!(
            (z.diff, z.lo, z.hi, z.better, z.worse),
            (0.0, 0.0, 0.0, 0, 0)
        );
        assert_eq!(z.p_mcnemar, 1.0);
    }
}
