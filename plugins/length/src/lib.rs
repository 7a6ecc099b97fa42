//! The `length` prompt filter: keeps candidates whose word count is within
//! [min-words, max-words] (max-words 0: no upper bound).

use selma_plugin_sdk::text::word_count;
use selma_plugin_sdk::{
    keep, params, reject, Metadata, Params, Plugin, PluginKind, PromptFilter, Verdict,
};

struct Length;

impl Plugin for Length {
    fn metadata() -> Metadata {
        Metadata {
            name: "length".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kind: PluginKind::PromptFilter,
            description: "Rejects candidates with too few or too many words.".into(),
            help: "words = whitespace-separated tokens. Keep if min-words <= words and \
                   (max-words == 0 or words <= max-words)."
                .into(),
            params: vec![
                params::integer("min-words", 1, "fewest words a prompt may have"),
                params::integer("max-words", 0, "most words a prompt may have (0: no limit)"),
            ],
        }
    }
}

/// One verdict (pure).
pub fn judge(candidate: &str, min_words: usize, max_words: usize) -> Verdict {
    let n = word_count(candidate);
    if n < min_words {
        reject(format!("{n} words, fewer than min-words {min_words}"))
    } else if max_words > 0 && n > max_words {
        reject(format!("{n} words, more than max-words {max_words}"))
    } else {
        keep()
    }
}

impl PromptFilter for Length {
    fn filter(
        candidates: Vec<String>,
        _pool: Vec<String>,
        params: Params,
    ) -> Result<Vec<Verdict>, String> {
        let min_words = params.u32("min-words")? as usize;
        let max_words = params.u32("max-words")? as usize;
        if max_words > 0 && max_words < min_words {
            return Err(format!(
                "parameters: max-words {max_words} is below min-words {min_words}; set max-words \
                 to 0 (no limit) or raise it"
            ));
        }
        Ok(candidates
            .iter()
            .map(|c| judge(c, min_words, max_words))
            .collect())
    }
}

selma_plugin_sdk::export!(prompt_filter: Length);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_inclusive_and_zero_means_unbounded() {
        assert!(!judge("", 1, 0).keep);
        assert!(judge("one", 1, 0).keep);
        assert!(judge("one two three", 1, 3).keep);
        let v = judge("one two three four", 1, 3);
        assert!(!v.keep && v.reason.unwrap().contains("4 words"));
        assert!(judge(&"w ".repeat(500), 1, 0).keep);
        assert!(!judge("one two", 3, 0).keep);
    }
}
