//! Glue used by [`crate::export!`]: one adapter type per world that
//! implements the generated `Guest` traits by calling the SDK traits.
//! Not part of the public API.

use crate::{GenerateRequest, Params};
use std::marker::PhantomData;

/// Per-world bindings and their export macros.
macro_rules! world_mod {
    ($name:ident, $krate:ident, $macro:ident) => {
        pub mod $name {
            pub use $krate as bindings;
            pub use $krate::$macro as export;
        }
    };
}
world_mod!(skill, selma_plugin_bindings_skill, export_skill);
world_mod!(
    prompt_generator,
    selma_plugin_bindings_prompt_generator,
    export_prompt_generator
);
world_mod!(
    prompt_filter,
    selma_plugin_bindings_prompt_filter,
    export_prompt_filter
);
world_mod!(
    image_filter,
    selma_plugin_bindings_image_filter,
    export_image_filter
);
world_mod!(
    merge_strategy,
    selma_plugin_bindings_merge_strategy,
    export_merge_strategy
);

macro_rules! plugin_guest {
    ($adapter:ident, $krate:ident, $bound:path) => {
        /// Adapter from the SDK traits to the generated bindings.
        pub struct $adapter<T>(PhantomData<T>);

        impl<T: $bound> $krate::exports::selma::plugin::plugin::Guest for $adapter<T> {
            fn metadata() -> crate::Metadata {
                T::metadata()
            }
        }
    };
}
plugin_guest!(SkillAdapter, selma_plugin_bindings_skill, crate::Skill);
plugin_guest!(
    PromptGeneratorAdapter,
    selma_plugin_bindings_prompt_generator,
    crate::PromptGenerator
);
plugin_guest!(
    PromptFilterAdapter,
    selma_plugin_bindings_prompt_filter,
    crate::PromptFilter
);
plugin_guest!(
    ImageFilterAdapter,
    selma_plugin_bindings_image_filter,
    crate::ImageFilter
);
plugin_guest!(
    MergeStrategyAdapter,
    selma_plugin_bindings_merge_strategy,
    crate::MergeStrategy
);

impl<T: crate::Skill> selma_plugin_bindings_skill::exports::selma::plugin::skill::Guest
    for SkillAdapter<T>
{
    fn info() -> selma_plugin_bindings_skill::exports::selma::plugin::skill::SkillInfo {
        use selma_plugin_bindings_skill::exports::selma::plugin::skill as out;
        let i = T::info();
        out::SkillInfo {
            id: i.id,
            description: i.description,
            seeds: i.seeds,
            rules: out::Rules {
                max_words: i.rules.max_words,
                constraints: i.rules.constraints,
                instruction: i.rules.instruction,
            },
            templates: i.templates.map(|t| out::Templates {
                patterns: t.patterns,
                slots: t
                    .slots
                    .into_iter()
                    .map(|s| out::Slot {
                        name: s.name,
                        values: s.values,
                    })
                    .collect(),
            }),
        }
    }
}

impl<T: crate::PromptGenerator>
    selma_plugin_bindings_prompt_generator::exports::selma::plugin::prompt_generator::Guest
    for PromptGeneratorAdapter<T>
{
    fn generate(
        request: selma_plugin_bindings_prompt_generator::exports::selma::plugin::prompt_generator::GenerateRequest,
    ) -> Result<Vec<String>, String> {
        T::generate(GenerateRequest {
            skill: request.skill,
            pool: request.pool,
            wanted: request.wanted,
            round: request.round,
            params: Params::new(request.params),
        })
    }
}

impl<T: crate::PromptFilter>
    selma_plugin_bindings_prompt_filter::exports::selma::plugin::prompt_filter::Guest
    for PromptFilterAdapter<T>
{
    fn filter(
        candidates: Vec<String>,
        pool: Vec<String>,
        params: Vec<crate::Param>,
    ) -> Result<Vec<crate::Verdict>, String> {
        let n = candidates.len();
        let verdicts = T::filter(candidates, pool, Params::new(params))?;
        if verdicts.len() != n {
            return Err(format!(
                "prompt filter returned {} verdicts for {n} candidates (one per candidate expected)",
                verdicts.len()
            ));
        }
        Ok(verdicts)
    }
}

impl<T: crate::ImageFilter>
    selma_plugin_bindings_image_filter::exports::selma::plugin::image_filter::Guest
    for ImageFilterAdapter<T>
{
    fn check(
        img: &crate::Image,
        prompt: String,
        params: Vec<crate::Param>,
    ) -> Result<crate::ImageVerdict, String> {
        let v = T::check(img, prompt, Params::new(params))?;
        // One rule for every bad score (NaN, Inf, below 0, above 1): an
        // error, never a silent clamp.
        if !(0.0..=1.0).contains(&v.score) {
            return Err(format!(
                "image filter returned the score {}: scores are fractions in [0, 1]",
                v.score
            ));
        }
        Ok(v)
    }
}

impl<T: crate::MergeStrategy>
    selma_plugin_bindings_merge_strategy::exports::selma::plugin::merge_strategy::Guest
    for MergeStrategyAdapter<T>
{
    fn merge_layer(
        layer: String,
        experts: Vec<crate::ExpertLayer>,
        rank: Option<u32>,
        params: Vec<crate::Param>,
    ) -> Result<crate::MergedLayer, String> {
        T::merge_layer(layer, experts, rank, Params::new(params))
    }
}
