//! ShapeWorld: procedural scenes of coloured shapes with captions from a
//! small grammar, written as an image folder with `metadata.jsonl`.
//!
//! The world and the grammar follow the team's ShapeWorld spec: 32x32 RGB,
//! background (240,240,240), 1-4 non-overlapping objects (circle, square,
//! triangle; red, green, blue, yellow; box side 7..=10 px), captions in five
//! forms (single, count, plural, binding, spatial).
//!
//! - [`scene`]: the scene model and the exact renderer.
//! - [`alttext`]: world v2's alt-text pretraining captions and their meaning.
//! - [`caption`]: captions, their text, parsing, and ground truth against a scene.
//! - [`sample`]: the seeded sampler (one scene per form) and the form mix.
//! - [`dataset`]: the dataset writer (PNG folder + `metadata.jsonl`, atomic).

pub mod alttext;
pub mod caption;
pub mod dataset;
pub mod sample;
pub mod scene;

pub use alttext::{describe, AltText, AltTextRates, Mention};
pub use caption::{Caption, Form, Relation};
pub use dataset::{
    dataset_entry, dataset_scene, encode_png, read_png, write_dataset, DatasetOptions,
    DatasetSummary, MetaLine,
};
pub use sample::{sample, sample_caption, scene_seed, Mix, SampleOptions, SplitMix64, World};
pub use scene::{Color, Object, Scene, Shape, BACKGROUND, SIZE};
