//! The SDK's documentation example (plugin-sdk/src/lib.rs), compiled as a
//! real plugin: a prompt filter that rejects prompts with very long words.

use selma_plugin_sdk::{params, text, Metadata, Params, Plugin, PluginKind, PromptFilter, Verdict};

struct ShortWords;

impl Plugin for ShortWords {
    fn metadata() -> Metadata {
        Metadata {
            name: "short-words".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kind: PluginKind::PromptFilter,
            description: "Rejects prompts that contain a very long word.".into(),
            help: "reject if any token (rouge tokenisation) has more than max-len characters"
                .into(),
            params: vec![params::integer(
                "max-len",
                12,
                "longest allowed word, in characters",
            )],
        }
    }
}

impl PromptFilter for ShortWords {
    fn filter(
        candidates: Vec<String>,
        _pool: Vec<String>,
        params: Params,
    ) -> Result<Vec<Verdict>, String> {
        let max_len = params.i64("max-len")? as usize;
        Ok(candidates
            .iter()
            .map(
                |c| match text::tokenize(c).into_iter().find(|t| t.len() > max_len) {
                    Some(word) => selma_plugin_sdk::reject(format!(
                        "word \"{word}\" is longer than {max_len}"
                    )),
                    None => selma_plugin_sdk::keep(),
                },
            )
            .collect())
    }
}

selma_plugin_sdk::export!(prompt_filter: ShortWords);
