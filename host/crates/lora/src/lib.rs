//! selma-lora: LoRA adapters as files and as maths.
//!
//! - [`LoraFile`] / [`LoraLayer`]: read (auto-detected) and write (atomic) the
//!   peft/diffusers and kohya safetensors layouts, keyed by canonical module
//!   paths (`unet.down_blocks.0....attn1.to_q`).
//! - [`ops`]: the fused f32 tensor operations merge strategies are built from
//!   (the runtime's `tensor` resource and [`native`] share them).
//! - [`native`]: the bundled merge strategies written directly in Rust, the
//!   baseline for benchmarks and an independent check of the plugins.
//! - [`names`]: key layouts and the kohya <-> diffusers module-name mapping.

pub mod file;
pub mod names;
pub mod native;
pub mod ops;
pub mod rng;

pub use file::{LoraFile, LoraFormat, LoraLayer};
