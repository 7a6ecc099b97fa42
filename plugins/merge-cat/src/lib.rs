//! The `cat` merge strategy: the experts' factors concatenated, always
//! exact (rank = sum of the experts' ranks).

use std::sync::atomic::{AtomicBool, Ordering};

use selma_merge_common::sdk::{experts, into_layer, HostOps};
use selma_plugin_sdk::{
    ExpertLayer, MergeStrategy, MergedLayer, Metadata, Params, Plugin, PluginKind,
};

/// The plugin type.
struct Cat;

impl Plugin for Cat {
    fn metadata() -> Metadata {
        Metadata {
            name: "cat".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kind: PluginKind::MergeStrategy,
            description:
                "Concatenate the experts' factors: the exact weighted sum, rank = sum of ranks."
                    .into(),
            help: "up = [w_1 s_1 up_1 | ... | w_K s_K up_K], down = [down_1; ...; down_K], so \
                   up @ down = sum_i w_i * s_i * up_i @ down_i exactly (s_i = alpha_i / r_i, w_i \
                   the expert weights, default 1/K). The merged rank is the sum of the experts' \
                   ranks; a requested rank is ignored (use `linear` or `svd` to reduce it)."
                .into(),
            params: vec![],
        }
    }
}

impl MergeStrategy for Cat {
    fn merge_layer(
        layer: String,
        experts_in: Vec<ExpertLayer>,
        rank: Option<u32>,
        _params: Params,
    ) -> Result<MergedLayer, String> {
        static WARNED: AtomicBool = AtomicBool::new(false);
        if let Some(r) = rank {
            if !WARNED.swap(true, Ordering::Relaxed) {
                selma_plugin_sdk::warn!(
                    "cat keeps every expert's rank (sum of ranks); the requested rank {r} is ignored"
                );
            }
        }
        let list = experts(&experts_in);
        selma_merge_common::cat(&HostOps, &layer, &list).map(into_layer)
    }
}

selma_plugin_sdk::export!(merge_strategy: Cat);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_names_the_plugin() {
        let m = Cat::metadata();
        assert_eq!((m.name.as_str(), m.params.len()), ("cat", 0));
        assert!(matches!(m.kind, PluginKind::MergeStrategy));
    }
}
