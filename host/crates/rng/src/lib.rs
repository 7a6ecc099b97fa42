//! Seeded random numbers that are the same on every platform, release and
//! target (host and WASM plugins): the [`Rng`] trait with its one unbiased
//! bounded draw, the [`SplitMix64`] and [`Xoshiro256pp`] generators, Box-Muller
//! normals, and the one Fisher-Yates [`shuffle`] / [`sample_k`] every crate
//! uses. No dependencies, so the plugin SDK can use it on wasm32.

#![forbid(unsafe_code)]

/// 2^-53: turns the top 53 bits of a draw into a float in [0, 1).
const INV_2_53: f64 = 1.0 / (1u64 << 53) as f64;

/// A source of uniformly distributed 64-bit integers, and the draws every
/// selma stream derives from them.
pub trait Rng {
    /// The next uniformly distributed u64.
    fn next_u64(&mut self) -> u64;

    /// A uniform integer in `0..n` without bias (`n` must be > 0): draws at
    /// or above the largest multiple of `n` that fits in a u64 are rejected,
    /// the accepted draw is reduced modulo `n`.
    fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
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
        (self.next_u64() >> 11) as f64 * INV_2_53
    }

    /// A uniform float in (0, 1]: 53 random bits plus half a step, so it is
    /// never 0 (safe under `ln`); only the largest draw rounds up to 1.0.
    fn next_f64_positive(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) * INV_2_53
    }

    /// A fair coin (the top bit of one draw).
    fn coin(&mut self) -> bool {
        self.next_u64() >> 63 == 1
    }

    /// A uniformly chosen element of `items` (non-empty).
    fn pick<T: Copy>(&mut self, items: &[T]) -> T
    where
        Self: Sized,
    {
        items[self.below(items.len() as u64) as usize]
    }
}

impl<R: Rng + ?Sized> Rng for &mut R {
    fn next_u64(&mut self) -> u64 {
        (**self).next_u64()
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): a 64-bit state advanced by a Weyl
/// sequence and mixed by two multiply-xorshift rounds; small, fast, seedable,
/// not cryptographic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator whose whole stream is fixed by `seed`.
    pub const fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The stream's position: `SplitMix64::new(g.state())` continues exactly
    /// where `g` is.
    pub const fn state(&self) -> u64 {
        self.state
    }

    /// The next uniformly distributed u64.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.state)
    }

    /// A uniform integer in `0..n` (see [`Rng::below`]).
    pub fn below(&mut self, n: u64) -> u64 {
        Rng::below(self, n)
    }

    /// A uniform float in [0, 1) (see [`Rng::next_f64`]).
    pub fn next_f64(&mut self) -> f64 {
        Rng::next_f64(self)
    }
}

impl Rng for SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        SplitMix64::next_u64(self)
    }
}

/// SplitMix64's output mix of a state word.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The first output of a [`SplitMix64`] seeded with `x`: a well-mixed
/// 64-bit hash of `x`.
pub fn splitmix64(x: u64) -> u64 {
    mix64(x.wrapping_add(0x9E37_79B9_7F4A_7C15))
}

/// xoshiro256++ (Blackman, Vigna 2019), its 256-bit state expanded from a
/// 64-bit seed by the first four outputs of [`SplitMix64`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Xoshiro256pp {
    s: [u64; 4],
}

impl Xoshiro256pp {
    /// A generator for `seed` (equal seeds give equal streams).
    pub fn new(seed: u64) -> Self {
        let mut sm = SplitMix64::new(seed);
        Self {
            s: [sm.next_u64(), sm.next_u64(), sm.next_u64(), sm.next_u64()],
        }
    }

    /// A generator continuing from a saved [`state`](Self::state).
    pub const fn from_state(s: [u64; 4]) -> Self {
        Self { s }
    }

    /// The whole state (what a checkpoint stores).
    pub const fn state(&self) -> [u64; 4] {
        self.s
    }

    /// The next uniformly distributed u64.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }
}

impl Rng for Xoshiro256pp {
    fn next_u64(&mut self) -> u64 {
        Xoshiro256pp::next_u64(self)
    }
}

/// Two independent standard-normal values from two [`Rng::next_f64_positive`] draws
/// `u1`, `u2` (Box-Muller in f64): `(r cos t, r sin t)` with
/// `r = sqrt(-2 ln u1)`, `t = 2 pi u2`.
pub fn normal_pair(rng: &mut impl Rng) -> (f64, f64) {
    let u1 = rng.next_f64_positive();
    let u2 = rng.next_f64_positive();
    let r = (-2.0 * u1.ln()).sqrt();
    let th = std::f64::consts::TAU * u2;
    (r * th.cos(), r * th.sin())
}

/// A standard-normal stream: Box-Muller pairs from [`normal_pair`], the
/// second value of each pair kept for the next call.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Normal {
    /// The second value of the last pair, not yet returned.
    pub spare: Option<f64>,
}

impl Normal {
    /// One standard-normal draw from `rng`.
    pub fn sample(&mut self, rng: &mut impl Rng) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let (a, b) = normal_pair(rng);
        self.spare = Some(b);
        a
    }
}

/// Shuffle `items` in place, every order equally likely (Fisher-Yates from
/// the back: slot `i` swaps with a uniform slot in `0..=i`).
pub fn shuffle<T>(items: &mut [T], rng: &mut impl Rng) {
    for i in (1..items.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        items.swap(i, j);
    }
}

/// A uniformly random permutation of `0..n` ([`shuffle`] of the identity).
pub fn permutation(n: usize, rng: &mut impl Rng) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    shuffle(&mut v, rng);
    v
}

/// `min(k, n)` distinct indices drawn uniformly from `0..n`, in draw order
/// (a partial Fisher-Yates shuffle from the front).
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

#[cfg(test)]
mod tests;
