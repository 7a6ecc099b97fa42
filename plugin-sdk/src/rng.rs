//! Small deterministic randomness: the [`Rng`] trait (implemented by the
//! host's seeded source and by [`SplitMix64`]), unbiased bounded draws and
//! sampling `k` of `n` without replacement.

/// A source of uniformly distributed 64-bit integers.
pub trait Rng {
    /// The next uniformly distributed u64.
    fn next_u64(&mut self) -> u64;

    /// A uniform integer in `0..n` without modulo bias (`n` must be > 0).
    fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        // Largest multiple of n that fits: accept draws under it only.
        let zone = (u64::MAX / n) * n;
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }

    /// A uniform float in [0, 1) with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny seeded generator, good
/// enough for sampling and template filling; not cryptographic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator whose whole stream is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }
}

impl Rng for SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// `min(k, n)` distinct indices drawn uniformly from `0..n`, in draw order
/// (a partial Fisher-Yates shuffle).
pub fn sample_k(n: usize, k: usize, rng: &mut impl Rng) -> Vec<usize> {
    let k = k.min(n);
    let mut idx: Vec<usize> = (0..n).collect();
    for i in 0..k {
        let j = i + rng.below((n - i) as u64) as usize;
        idx.swap(i, j);
    }
    idx.truncate(k);
    idx
}

/// [`sample_k`] with a fresh [`SplitMix64`] seeded by `seed`.
pub fn sample_k_seeded(n: usize, k: usize, seed: u64) -> Vec<usize> {
    sample_k(n, k, &mut SplitMix64::new(seed))
}

/// Shuffle `items` in place (Fisher-Yates).
pub fn shuffle<T>(items: &mut [T], rng: &mut impl Rng) {
    for i in (1..items.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference_stream() {
        // Seed 0: the published first outputs of Vigna's splitmix64.c; seed
        // 1234567: computed by an independent Python implementation.
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        let mut r = SplitMix64::new(1_234_567);
        assert_eq!(r.next_u64(), 6_457_827_717_110_365_317);
    }

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut r = SplitMix64::new(7);
        let mut seen = [0usize; 6];
        for _ in 0..6000 {
            seen[r.below(6) as usize] += 1;
        }
        // Each face ~1000; a fair generator is far inside these bounds.
        assert!(seen.iter().all(|&c| (850..1150).contains(&c)), "{seen:?}");
        assert!((0..1000).all(|_| r.next_f64() < 1.0));
    }

    #[test]
    fn sample_k_draws_distinct_indices_uniformly() {
        let s = sample_k_seeded(10, 3, 42);
        assert_eq!(s.len(), 3);
        let mut d = s.clone();
        d.sort();
        d.dedup();
        assert_eq!(d.len(), 3);
        assert!(s.iter().all(|&i| i < 10));
        // Same seed, same draw; k clipped to n.
        assert_eq!(sample_k_seeded(10, 3, 42), s);
        let mut all = sample_k_seeded(4, 9, 1);
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3]);
        assert!(sample_k_seeded(0, 3, 1).is_empty());
        // Every index is picked about k/n of the time.
        let mut r = SplitMix64::new(3);
        let mut hits = [0usize; 5];
        for _ in 0..5000 {
            for i in sample_k(5, 2, &mut r) {
                hits[i] += 1;
            }
        }
        assert!(hits.iter().all(|&h| (1800..2200).contains(&h)), "{hits:?}");
    }

    #[test]
    fn shuffle_is_a_permutation() {
        let mut v: Vec<u32> = (0..50).collect();
        shuffle(&mut v, &mut SplitMix64::new(9));
        assert_ne!(v, (0..50).collect::<Vec<_>>());
        v.sort();
        assert_eq!(v, (0..50).collect::<Vec<_>>());
    }
}
