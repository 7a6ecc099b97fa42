//! Small deterministic randomness for plugins, from `selma-rng`: the [`Rng`]
//! trait (implemented by the host's seeded source and by [`SplitMix64`]),
//! unbiased bounded draws, shuffles and sampling `k` of `n` without
//! replacement.

pub use selma_rng::{permutation, sample_k, shuffle, splitmix64, Rng, SplitMix64};

/// [`sample_k`] with a fresh [`SplitMix64`] seeded by `seed`.
pub fn sample_k_seeded(n: usize, k: usize, seed: u64) -> Vec<usize> {
    sample_k(n, k, &mut SplitMix64::new(seed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_k_seeded_is_sample_k_of_a_fresh_generator() {
        let s = sample_k_seeded(10, 3, 42);
        assert_eq!(s, sample_k(10, 3, &mut SplitMix64::new(42)));
        let mut d = s.clone();
        d.sort();
        d.dedup();
        assert_eq!(d.len(), 3);
        assert!(s.iter().all(|&i| i < 10));
        let mut all = sample_k_seeded(4, 9, 1);
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3]);
        assert!(sample_k_seeded(0, 3, 1).is_empty());
    }
}
