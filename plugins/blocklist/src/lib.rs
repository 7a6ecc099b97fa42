//! The `blocklist` prompt filter: rejects candidates that contain a blocked
//! word or phrase (case-insensitive, whole words, rouge_score tokenisation),
//! e.g. unsafe content or an LLM's refusal boilerplate.

use selma_plugin_sdk::text::tokenize;
use selma_plugin_sdk::{
    keep, params, reject, Metadata, Params, Plugin, PluginKind, PromptFilter, Verdict,
};

/// The default list: explicit or gory content, and phrases that mark an LLM
/// reply that is not a prompt at all.
pub const DEFAULT_WORDS: &str = "nsfw, nude, naked, porn, pornographic, explicit, erotic, \
    gore, gory, bloody, corpse, decapitated, suicide, self-harm, \
    as an ai, language model, i'm sorry, i cannot, i can't";

struct Blocklist;

impl Plugin for Blocklist {
    fn metadata() -> Metadata {
        Metadata {
            name: "blocklist".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kind: PluginKind::PromptFilter,
            description: "Rejects candidates containing a blocked word or phrase.".into(),
            help: "Both the candidate and each entry are tokenised (lowercase, split on \
                   [^a-z0-9]+); a candidate is rejected if an entry's tokens appear in it as \
                   consecutive whole tokens. 'gore' blocks 'gore' but not 'gorge'."
                .into(),
            params: vec![params::text(
                "words",
                DEFAULT_WORDS,
                "comma-separated words or phrases to block (case-insensitive, whole words)",
            )],
        }
    }
}

/// Parse the comma-separated list into token sequences (empty entries dropped).
pub fn parse_list(words: &str) -> Vec<(String, Vec<String>)> {
    words
        .split(',')
        .map(str::trim)
        .filter_map(|w| {
            let t = tokenize(w);
            (!t.is_empty()).then(|| (w.to_string(), t))
        })
        .collect()
}

/// The first blocked entry found in `candidate`, if any.
pub fn find_blocked<'a>(candidate: &str, list: &'a [(String, Vec<String>)]) -> Option<&'a str> {
    let tokens = tokenize(candidate);
    list.iter()
        .find(|(_, phrase)| tokens.windows(phrase.len()).any(|w| w == phrase.as_slice()))
        .map(|(entry, _)| entry.as_str())
}

impl PromptFilter for Blocklist {
    fn filter(
        candidates: Vec<String>,
        _pool: Vec<String>,
        params: Params,
    ) -> Result<Vec<Verdict>, String> {
        let list = parse_list(params.str("words")?);
        Ok(candidates
            .iter()
            .map(|c| match find_blocked(c, &list) {
                Some(entry) => reject(format!("contains blocked \"{entry}\"")),
                None => keep(),
            })
            .collect())
    }
}

selma_plugin_sdk::export!(prompt_filter: Blocklist);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_word_case_insensitive_phrase_matching() {
        let list = parse_list("gore, as an AI, red car,, ");
        assert_eq!(list.len(), 3);
        assert_eq!(find_blocked("A GORE-filled scene", &list), Some("gore"));
        assert_eq!(find_blocked("a mountain gorge at dawn", &list), None);
        assert_eq!(
            find_blocked("As an AI, I cannot draw", &list),
            Some("as an AI")
        );
        assert_eq!(find_blocked("an AI robot", &list), None);
        assert_eq!(find_blocked("a red, car", &list), Some("red car"));
        assert_eq!(find_blocked("a red sports car", &list), None);
    }

    #[test]
    fn default_list_catches_refusals_and_keeps_ordinary_prompts() {
        let list = parse_list(DEFAULT_WORDS);
        assert!(find_blocked("I'm sorry, but I can't help with that.", &list).is_some());
        assert!(find_blocked("A naked mole rat in a zoo", &list).is_some());
        assert!(find_blocked("Two dogs playing in a park", &list).is_none());
        assert!(find_blocked("A bloodhound sniffing a trail", &list).is_none());
    }
}
