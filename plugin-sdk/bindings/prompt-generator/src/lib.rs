//! Generated bindings of the `selma:plugin@0.1.0` `prompt-generator` world.
//!
//! One crate per world because every world exports the `plugin` interface and
//! wit-bindgen names its public export macro after the interface: two worlds
//! in one crate would define the same `#[macro_export]` macro twice. Imports
//! come from `selma-plugin-bindings-imports` (`with`), so types are shared.
//! Plugin authors use `selma-plugin-sdk`'s `export!`, never this crate.
#![allow(missing_docs, clippy::all)]

wit_bindgen::generate!({
    path: "../../../wit",
    world: "selma:plugin/prompt-generator-plugin@0.1.0",
    with: {
        "selma:plugin/types@0.1.0": selma_plugin_bindings_imports::selma::plugin::types,
        "selma:plugin/log@0.1.0": selma_plugin_bindings_imports::selma::plugin::log,
        "selma:plugin/random@0.1.0": selma_plugin_bindings_imports::selma::plugin::random,
        "selma:plugin/llm@0.1.0": selma_plugin_bindings_imports::selma::plugin::llm,
        "selma:plugin/skill@0.1.0": selma_plugin_bindings_imports::selma::plugin::skill,
    },
    pub_export_macro: true,
    export_macro_name: "export_prompt_generator",
    default_bindings_module: "$crate",
    type_section_suffix: "selma-plugin-bindings-prompt-generator",
});
