//! ShapeWorld experiments (`selma shapeworld eval|selfgen`): verifier
//! accuracy of a model (and LoRA variants) per skill on seeded held-out
//! prompts, with intervals and paired tests, and self-generated datasets.
//!
//! `accuracy` draws the prompts and noise, renders every variant and scores
//! the images with the verifier plugin; `render` renders many prompts in one
//! batch; `paired` holds the paired statistics (bootstrap, McNemar);
//! `selfgen` writes a verified training folder.

pub mod accuracy;
pub mod paired;
pub mod render;
pub mod selfgen;

pub use accuracy::{EvalConfig, EvalReport, Variant};
pub use render::{Renderer, SampleSettings};
