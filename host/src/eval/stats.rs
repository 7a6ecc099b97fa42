//! Summary statistics of per-prompt scores: the mean with a 95% interval
//! (Student t for small samples, normal for n >= 30, Wilson for 0/1 data).

/// Two-sided 97.5% quantiles of Student's t for 1..=29 degrees of freedom.
const T975: [f64; 29] = [
    12.706_204_736,
    4.302_652_730,
    3.182_446_305,
    2.776_445_105,
    2.570_581_836,
    2.446_911_851,
    2.364_624_252,
    2.306_004_135,
    2.262_157_163,
    2.228_138_852,
    2.200_985_160,
    2.178_812_830,
    2.160_368_656,
    2.144_786_688,
    2.131_449_546,
    2.119_905_299,
    2.109_815_578,
    2.100_922_040,
    2.093_024_054,
    2.085_963_447,
    2.079_613_845,
    2.073_873_068,
    2.068_657_610,
    2.063_898_562,
    2.059_538_553,
    2.055_529_439,
    2.051_830_516,
    2.048_407_142,
    2.045_229_642,
];

/// The 97.5% quantile of the standard normal distribution.
pub const Z975: f64 = 1.959_963_984_540_054;

/// The 97.5% quantile of Student's t with `df` degrees of freedom (normal
/// quantile from 30 on; `df` must be at least 1).
pub fn t975(df: usize) -> f64 {
    match df {
        0 => f64::INFINITY,
        1..=29 => T975[df - 1],
        _ => Z975,
    }
}

/// True when every value is exactly 0 or 1 (pass/fail data).
fn is_binary(xs: &[f64]) -> bool {
    xs.iter().all(|&x| x == 0.0 || x == 1.0)
}

/// Wilson score interval of `k` successes in `n` trials at z = 1.96.
pub fn wilson95(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let n = n as f64;
    let p = k as f64 / n;
    let z2 = Z975 * Z975;
    let denom = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denom;
    let half = Z975 / denom * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// Mean and 95% interval of per-prompt scores (Student t for n<30 else normal; for 0/1
/// scores use the Wilson interval). Returns (mean, lo, hi).
///
/// An empty slice gives NaNs; a single non-binary value gives the degenerate
/// interval `[x, x]` (one sample has no spread estimate).
pub fn mean_ci95(xs: &[f64]) -> (f64, f64, f64) {
    let n = xs.len();
    if n == 0 {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    if is_binary(xs) {
        let k = xs.iter().filter(|&&x| x == 1.0).count();
        let (lo, hi) = wilson95(k, n);
        return (mean, lo, hi);
    }
    mean_ci95_t(xs)
}

/// Clip an interval to [0, 1] when every value lies there (image-filter
/// scores and pass rates: their mean cannot leave [0, 1], while a t interval
/// of a few values easily does); other scales (CLIPScore) are left alone.
fn clip_to_unit(xs: &[f64], (mean, lo, hi): (f64, f64, f64)) -> (f64, f64, f64) {
    if xs.iter().all(|x| (0.0..=1.0).contains(x)) {
        (mean, lo.max(0.0), hi.min(1.0))
    } else {
        (mean, lo, hi)
    }
}

/// Mean and 95% Student-t interval of a few values (e.g. one mean per seed),
/// never the Wilson interval: the values are means, not pass/fail data.
/// Returns (mean, lo, hi); one value gives `[x, x]`, none gives NaNs. Values
/// that all lie in [0, 1] get an interval clipped to [0, 1].
pub fn mean_ci95_t(xs: &[f64]) -> (f64, f64, f64) {
    let n = xs.len();
    if n == 0 {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return (mean, mean, mean);
    }
    let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1) as f64;
    let half = t975(n - 1) * (var / n as f64).sqrt();
    clip_to_unit(xs, (mean, mean - half, mean + half))
}

/// The unweighted mean of several groups' means (e.g. skills) with a normal
/// 95% interval from the groups' standard errors (independent groups):
/// half-width 1.96 sqrt(sum s_k^2 / n_k) / K. Groups of one value add no
/// spread; values that all lie in [0, 1] get an interval clipped to [0, 1].
pub fn mean_of_means_ci95(groups: &[Vec<f64>]) -> (f64, f64, f64) {
    let groups: Vec<&Vec<f64>> = groups.iter().filter(|g| !g.is_empty()).collect();
    if groups.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let k = groups.len() as f64;
    let mut mean = 0.0;
    let mut var_sum = 0.0;
    for g in &groups {
        let n = g.len() as f64;
        let m = g.iter().sum::<f64>() / n;
        mean += m / k;
        if g.len() > 1 {
            let v = g.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0);
            var_sum += v / n;
        }
    }
    let half = Z975 * var_sum.sqrt() / k;
    let all: Vec<f64> = groups.iter().flat_map(|g| g.iter().copied()).collect();
    clip_to_unit(&all, (mean, mean - half, mean + half))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    /// Student t CDF at `t` (> 0) by Simpson's rule over the density, with
    /// Gamma((v+1)/2) / Gamma(v/2) from its recurrence: an independent check
    /// of the tabulated quantiles.
    fn t_cdf(t: f64, df: usize) -> f64 {
        let pi = std::f64::consts::PI;
        // ratio(v) = Gamma((v+1)/2) / Gamma(v/2); ratio(v+2) = ratio(v) (v+1)/v
        let mut ratio = if df % 2 == 1 {
            1.0 / pi.sqrt()
        } else {
            pi.sqrt() / 2.0
        };
        let mut v = if df % 2 == 1 { 1 } else { 2 };
        while v < df {
            ratio *= (v as f64 + 1.0) / v as f64;
            v += 2;
        }
        let nu = df as f64;
        let c = ratio / (nu * pi).sqrt();
        let f = |x: f64| c * (1.0 + x * x / nu).powf(-(nu + 1.0) / 2.0);
        let steps = 20_000;
        let h = t / steps as f64;
        let mut s = f(0.0) + f(t);
        for i in 1..steps {
            s += f(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
        }
        0.5 + s * h / 3.0
    }

    #[test]
    fn t_table_matches_numerical_cdf() {
        for df in 1..=29 {
            let p = t_cdf(t975(df), df);
            assert!(close(p, 0.975, 1e-7), "df {df}: cdf {p}");
        }
        assert_eq!(t975(30), Z975);
    }

    #[test]
    fn student_t_interval_by_hand() {
        // mean 3, s = sqrt(2.5), se = sqrt(0.5), t(4) = 2.776445105
        let (m, lo, hi) = mean_ci95(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        assert!(close(m, 3.0, 1e-12));
        assert!(close(lo, 3.0 - 1.963_243_2, 1e-6), "lo {lo}");
        assert!(close(hi, 3.0 + 1.963_243_2, 1e-6), "hi {hi}");
        // two values 10, 20: mean 15, s = sqrt(50), se = 5, t(1) = 12.7062
        let (m, lo, hi) = mean_ci95(&[10.0, 20.0]);
        assert!(close(m, 15.0, 1e-12));
        assert!(close(hi - m, 63.531_023_68, 1e-6), "half {}", hi - m);
        assert!(close(m - lo, 63.531_023_68, 1e-6));
    }

    #[test]
    fn normal_interval_from_thirty() {
        // 0..40: mean 19.5, sample variance n(n+1)/12 = 136.666.., se = 1.848422
        let xs: Vec<f64> = (0..40).map(|i| i as f64 + 0.5).collect();
        let (m, lo, hi) = mean_ci95(&xs);
        assert!(close(m, 20.0, 1e-12));
        assert!(close(hi - m, 3.622_842, 1e-5), "half {}", hi - m);
        assert!(close(m - lo, hi - m, 1e-12));
    }

    #[test]
    fn wilson_interval_by_hand() {
        // 3 of 10: the textbook Wilson interval [0.1078, 0.6032]
        let mut xs = vec![0.0; 10];
        xs[..3].fill(1.0);
        let (m, lo, hi) = mean_ci95(&xs);
        assert!(close(m, 0.3, 1e-12));
        assert!(close(lo, 0.107_791, 1e-5), "lo {lo}");
        assert!(close(hi, 0.603_222, 1e-5), "hi {hi}");
        // all passes: upper bound 1, lower n / (n + z^2)
        let (m, lo, hi) = mean_ci95(&[1.0; 5]);
        assert_eq!(m, 1.0);
        assert_eq!(hi, 1.0);
        assert!(close(lo, 5.0 / (5.0 + Z975 * Z975), 1e-12), "lo {lo}");
    }

    #[test]
    fn t_interval_over_seeds_by_hand() {
        // Values beyond [0, 1]: the plain t(1) interval.
        let (m, lo, hi) = mean_ci95_t(&[0.0, 2.0]);
        assert!(close(m, 1.0, 1e-12));
        // s = sqrt(2), se = 1, t(1) = 12.7062
        assert!(close(hi - m, 12.706_204_736, 1e-6), "half {}", hi - m);
        assert!(close(m - lo, hi - m, 1e-12));
        // 0 / 1 means are not pass/fail data here: a t interval, not Wilson,
        // clipped to [0, 1] where the mean of such scores lies.
        assert_eq!(mean_ci95_t(&[0.0, 1.0]), (0.5, 0.0, 1.0));
        let (m, lo, hi) = mean_ci95_t(&[0.80, 0.82, 0.84]);
        // s = 0.02, se = 0.011547, t(2) = 4.302653: [0.7703, 0.8697], inside.
        assert!(
            close(m, 0.82, 1e-12) && close(hi - m, 0.049_683, 1e-5),
            "{lo} {hi}"
        );
        assert!(close(m - lo, hi - m, 1e-12));
        let (_, lo, hi) = mean_ci95_t(&[0.95, 0.99]);
        assert_eq!(hi, 1.0);
        assert!(lo > 0.7 && lo < 0.95, "{lo}");
        assert_eq!(mean_ci95_t(&[0.3]), (0.3, 0.3, 0.3));
        assert!(mean_ci95_t(&[]).0.is_nan());
    }

    #[test]
    fn mean_of_means_by_hand() {
        // group means 2 and 11 -> 6.5; variances 1 (n 3) and 2 (n 2):
        // se^2 sum = 1/3 + 1 = 4/3; half = 1.96 sqrt(4/3) / 2
        let (m, lo, hi) = mean_of_means_ci95(&[vec![1.0, 2.0, 3.0], vec![10.0, 12.0]]);
        assert!(close(m, 6.5, 1e-12));
        let half = Z975 * (4.0f64 / 3.0).sqrt() / 2.0;
        assert!(close(hi - m, half, 1e-12) && close(m - lo, half, 1e-12));
        assert!(mean_of_means_ci95(&[]).0.is_nan());
        // [0, 1] scores: the interval stays in [0, 1].
        let (m, lo, hi) = mean_of_means_ci95(&[vec![0.0, 1.0], vec![1.0, 1.0, 0.0]]);
        assert!(close(m, (0.5 + 2.0 / 3.0) / 2.0, 1e-12));
        assert!(lo >= 0.0 && hi <= 1.0 && lo < m && m < hi, "{lo} {hi}");
    }

    #[test]
    fn degenerate_inputs() {
        let (m, lo, hi) = mean_ci95(&[]);
        assert!(m.is_nan() && lo.is_nan() && hi.is_nan());
        assert_eq!(mean_ci95(&[0.25]), (0.25, 0.25, 0.25));
        // constant non-binary data: zero-width interval
        assert_eq!(mean_ci95(&[0.5, 0.5, 0.5]), (0.5, 0.5, 0.5));
    }
}
