//! `selma-plugin-sdk`: write plugins for `selma` as WebAssembly components.
//!
//! A plugin is a `cdylib` crate built with
//! `cargo build --release --target wasm32-wasip2`. It implements [`Plugin`]
//! (name, version, kind, description, parameters) plus the trait of its kind
//! ([`Skill`], [`PromptGenerator`], [`PromptFilter`], [`ImageFilter`] or
//! [`MergeStrategy`]) and exports the type with [`export!`]:
//! `selma_plugin_sdk::export!(prompt_filter: MyFilter);`.
//!
//! | kind | trait | `export!` key | host imports in its world |
//! |---|---|---|---|
//! | skill | [`Skill`] | `skill` | [`log`] |
//! | prompt generator | [`PromptGenerator`] | `prompt_generator` | [`log`], [`random`], [`llm`] |
//! | prompt filter | [`PromptFilter`] | `prompt_filter` | [`log`] |
//! | image filter | [`ImageFilter`] | `image_filter` | [`log`], [`image`] |
//! | merge strategy | [`MergeStrategy`] | `merge_strategy` | [`log`], [`random`], [`tensor`] |
//!
//! The WIT worlds promise only these imports per kind. The `selma` host
//! happens to link every import for every kind (the LLM still needs a
//! grant), but stick to your kind's list so the component stays valid
//! against the contract.
//!
//! Host services are in [`log`], [`random`], [`llm`], [`tensor`], [`image`];
//! pure helpers in [`text`] (rouge_score-compatible ROUGE-L, numbered lists),
//! [`rng`] (seeded sampling), [`templates`] (slot filling) and [`skill`]
//! (skills written as constants).
//!
//! # A complete plugin
//!
//! `Cargo.toml`:
//! ```toml
//! [package]
//! name = "selma-plugin-short-words"
//! version = "0.1.0"
//! edition = "2021"
//!
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! selma-plugin-sdk = { path = "../../plugin-sdk" }
//! ```
//!
//! `src/lib.rs` (a prompt filter that rejects prompts with long words):
//! ```no_run
//! use selma_plugin_sdk::{params, text, Metadata, Params, Plugin, PluginKind, PromptFilter, Verdict};
//!
//! struct ShortWords;
//!
//! impl Plugin for ShortWords {
//!     fn metadata() -> Metadata {
//!         Metadata {
//!             name: "short-words".into(),
//!             version: env!("CARGO_PKG_VERSION").into(),
//!             kind: PluginKind::PromptFilter,
//!             description: "Rejects prompts that contain a very long word.".into(),
//!             help: "reject if any token (rouge tokenisation) has more than max-len characters".into(),
//!             params: vec![params::integer("max-len", 12, "longest allowed word, in characters")],
//!         }
//!     }
//! }
//!
//! impl PromptFilter for ShortWords {
//!     fn filter(candidates: Vec<String>, _pool: Vec<String>, params: Params) -> Result<Vec<Verdict>, String> {
//!         let max_len = params.i64("max-len")? as usize;
//!         Ok(candidates
//!             .iter()
//!             .map(|c| match text::tokenize(c).into_iter().find(|t| t.len() > max_len) {
//!                 Some(word) => selma_plugin_sdk::reject(format!("word \"{word}\" is longer than {max_len}")),
//!                 None => selma_plugin_sdk::keep(),
//!             })
//!             .collect())
//!     }
//! }
//!
//! selma_plugin_sdk::export!(prompt_filter: ShortWords);
//! # fn main() {}
//! ```
//!
//! Build: `cargo build --release --target wasm32-wasip2`; the component is
//! `target/wasm32-wasip2/release/selma_plugin_short_words.wasm`. The same
//! plugin, compiled, is `plugins/example` in this repository.

mod host;
pub mod params;
pub mod rng;
pub mod skill;
pub mod templates;
pub mod text;

pub use host::{image, llm, log, random, tensor};
pub use params::Params;

pub use image::{ChannelStats, Image};
pub use llm::CompletionRequest;
pub use selma_plugin_bindings_image_filter::exports::selma::plugin::image_filter::ImageVerdict;
pub use selma_plugin_bindings_imports::selma::plugin::skill::{Rules, SkillInfo, Slot, Templates};
pub use selma_plugin_bindings_imports::selma::plugin::types::{
    Metadata, Param, ParamSpec, ParamValue, PluginKind,
};
pub use selma_plugin_bindings_merge_strategy::exports::selma::plugin::merge_strategy::{
    ExpertLayer, MergedLayer,
};
pub use selma_plugin_bindings_prompt_filter::exports::selma::plugin::prompt_filter::Verdict;
pub use tensor::Tensor;

/// Self-description, shared by every plugin kind.
pub trait Plugin {
    /// Name, version, kind, description, help and parameter schema.
    /// Called once at load; must be cheap and pure.
    fn metadata() -> Metadata;
}

/// A skill: seeds, rules and templates for one thing a model should learn.
pub trait Skill: Plugin {
    /// The skill's definition. Must be pure.
    fn info() -> SkillInfo;
}

/// One `generate` call of a prompt generator.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateRequest {
    /// The skill to write prompts for.
    pub skill: SkillInfo,
    /// Seeds plus every prompt accepted so far.
    pub pool: Vec<String>,
    /// How many candidates the host would like (a hint).
    pub wanted: u32,
    /// 0-based round number.
    pub round: u32,
    /// Parameters (declared ones, with user values or defaults).
    pub params: Params,
}

/// Proposes candidate prompts for a skill (the host filters them).
pub trait PromptGenerator: Plugin {
    /// Return candidates; an `Err` aborts the stage with the message.
    fn generate(req: GenerateRequest) -> Result<Vec<String>, String>;
}

/// Accepts or rejects candidate prompts.
pub trait PromptFilter: Plugin {
    /// One verdict per candidate, in order. A candidate kept earlier in the
    /// same call counts as pooled for later ones.
    fn filter(
        candidates: Vec<String>,
        pool: Vec<String>,
        params: Params,
    ) -> Result<Vec<Verdict>, String>;
}

/// Keeps, rejects or scores one generated image.
pub trait ImageFilter: Plugin {
    /// Judge `img`, made for `prompt`. The score is in [0, 1], higher better.
    fn check(img: &Image, prompt: String, params: Params) -> Result<ImageVerdict, String>;
}

/// Merges LoRA experts, one adapted layer at a time.
pub trait MergeStrategy: Plugin {
    /// Merge `layer` from `experts` (each: up `[out, r]`, down `[r, in]`, scale,
    /// weight); `rank` is the user's requested rank, if any.
    fn merge_layer(
        layer: String,
        experts: Vec<ExpertLayer>,
        rank: Option<u32>,
        params: Params,
    ) -> Result<MergedLayer, String>;
}

/// A verdict that keeps the candidate.
pub fn keep() -> Verdict {
    Verdict {
        keep: true,
        reason: None,
    }
}

/// A verdict that rejects the candidate, saying why.
pub fn reject(reason: impl Into<String>) -> Verdict {
    Verdict {
        keep: false,
        reason: Some(reason.into()),
    }
}

/// Log with `format!` syntax at info level: `selma_plugin_sdk::info!("{n} kept")`.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log::info(::std::format!($($arg)*)) };
}

/// Log with `format!` syntax at warn level.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::log::warn(::std::format!($($arg)*)) };
}

/// Log with `format!` syntax at debug level.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => { $crate::log::debug(::std::format!($($arg)*)) };
}

/// Log with `format!` syntax at error level.
#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => { $crate::log::error(::std::format!($($arg)*)) };
}

/// Export a type as the plugin of this crate. One per crate:
/// `export!(skill: T)`, `export!(prompt_generator: T)`,
/// `export!(prompt_filter: T)`, `export!(image_filter: T)` or
/// `export!(merge_strategy: T)`, where `T` implements [`Plugin`] and the
/// kind's trait.
#[macro_export]
macro_rules! export {
    (skill: $t:ty) => {
        $crate::__export_world!(skill, SkillAdapter, $t);
    };
    (prompt_generator: $t:ty) => {
        $crate::__export_world!(prompt_generator, PromptGeneratorAdapter, $t);
    };
    (prompt_filter: $t:ty) => {
        $crate::__export_world!(prompt_filter, PromptFilterAdapter, $t);
    };
    (image_filter: $t:ty) => {
        $crate::__export_world!(image_filter, ImageFilterAdapter, $t);
    };
    (merge_strategy: $t:ty) => {
        $crate::__export_world!(merge_strategy, MergeStrategyAdapter, $t);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __export_world {
    ($world:ident, $adapter:ident, $t:ty) => {
        const _: () = {
            type __SelmaPluginExport = $crate::__private::$adapter<$t>;
            $crate::__private::$world::export!(
                __SelmaPluginExport with_types_in $crate::__private::$world::bindings
            );
        };
    };
}

#[doc(hidden)]
pub mod __private;
