//! Generated bindings of every host import of `selma:plugin@0.1.0` (log,
//! random, llm, tensor, image), the shared `types` and the `skill` records.
//!
//! Generated once here so that the five world crates share one Rust type per
//! WIT type (`with` remapping). Plugin authors use `selma-plugin-sdk`, which
//! re-exports what they need; this crate is an implementation detail.
#![allow(missing_docs, clippy::all)]

wit_bindgen::generate!({
    path: "../../../wit",
    inline: "
        package selma:sdk;
        world host-imports {
            import selma:plugin/types@0.1.0;
            import selma:plugin/log@0.1.0;
            import selma:plugin/random@0.1.0;
            import selma:plugin/llm@0.1.0;
            import selma:plugin/tensor@0.1.0;
            import selma:plugin/image@0.1.0;
            import selma:plugin/skill@0.1.0;
        }
    ",
    world: "selma:sdk/host-imports",
    generate_all,
    additional_derives: [PartialEq],
    type_section_suffix: "selma-plugin-bindings-imports",
});
