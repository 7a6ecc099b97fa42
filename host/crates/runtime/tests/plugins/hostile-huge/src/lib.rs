//! Test-only hostile prompt filter: returns 8 MiB of verdict reasons for "huge" and one verdict for "short".
//! Any other input is judged normally (keep even-length candidates, reject
//! the others with reason "odd"), so tests can check that a re-instantiated
//! instance works again.

use selma_plugin_sdk::{Metadata, Params, Plugin, PluginKind, PromptFilter, Verdict};

struct Hostile;

impl Plugin for Hostile {
    fn metadata() -> Metadata {
        Metadata {
            name: "hostile-huge".into(),
            version: "0.1.0".into(),
            kind: PluginKind::PromptFilter,
            description: "returns 8 MiB of verdict reasons for 'huge' and one verdict for 'short'."
                .into(),
            help: String::new(),
            params: vec![],
        }
    }
}

fn ordinary(candidates: &[String]) -> Vec<Verdict> {
    candidates
        .iter()
        .map(|c| {
            if c.len() % 2 == 0 {
                selma_plugin_sdk::keep()
            } else {
                selma_plugin_sdk::reject("odd")
            }
        })
        .collect()
}

impl PromptFilter for Hostile {
    fn filter(
        candidates: Vec<String>,
        _pool: Vec<String>,
        _params: Params,
    ) -> Result<Vec<Verdict>, String> {
        if candidates.iter().any(|c| c == "huge") {
            return Ok(vec![selma_plugin_sdk::reject("x".repeat(8 << 20))]);
        }
        if candidates.iter().any(|c| c == "short") {
            return Ok(vec![selma_plugin_sdk::keep()]);
        }
        Ok(ordinary(&candidates))
    }
}

selma_plugin_sdk::export!(prompt_filter: Hostile);
