//! Test-only hostile prompt filter: allocates without bound when a candidate is "oom".
//! Any other input is judged normally (keep even-length candidates, reject
//! the others with reason "odd"), so tests can check that a re-instantiated
//! instance works again.

use selma_plugin_sdk::{Metadata, Params, Plugin, PluginKind, PromptFilter, Verdict};

struct Hostile;

impl Plugin for Hostile {
    fn metadata() -> Metadata {
        Metadata {
            name: "hostile-oom".into(),
            version: "0.1.0".into(),
            kind: PluginKind::PromptFilter,
            description: "allocates without bound when a candidate is 'oom'.".into(),
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
        if candidates.iter().any(|c| c == "oom") {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        Ok(ordinary(&candidates))
    }
}

selma_plugin_sdk::export!(prompt_filter: Hostile);
