//! ShapeWorld experiments: verifier accuracy of a model (and LoRA variants)
//! per skill on seeded held-out prompts, with intervals and paired tests.
//!
//! `eval` draws the prompts and noise, renders every variant and scores the
//! images with the verifier plugin; `sampler` renders many prompts in one
//! batch; `paired` holds the paired statistics (bootstrap, McNemar).

pub mod eval;
pub mod paired;
pub mod sampler;

pub use eval::{EvalConfig, EvalReport, Variant};
pub use sampler::{Renderer, SampleSettings};
pub mod selfgen;
