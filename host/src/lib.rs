//! selma: teach a text-to-image diffusion model skills from its own
//! auto-generated data (SELMA), with sandboxed WebAssembly plugins.
//!
//! The library behind the `selma` binary. Heavy lifting lives in the
//! `selma-*` crates under `host/crates/` (diffusion, lora, runtime, llm,
//! train, shapeworld); this crate owns the command line and the pipeline glue
//! between them.

pub mod cli;
pub mod eval;
pub mod merge;
pub mod pipeline;
pub mod prompts;
pub mod tuning;
