//! The seeded random source of the native merge maths: `selma-rng`'s
//! [`SplitMix64`] (deterministic across platforms and releases, which
//! `rand`'s generators do not promise), re-exported for callers.

pub use selma_rng::{Rng, SplitMix64};
