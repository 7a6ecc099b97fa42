//! The `linear` merge strategy (selma's default): the exact weighted sum of
//! the experts' LoRA deltas, returned as exact concatenated factors.

use selma_merge_common::sdk::{experts, into_layer, HostOps};
use selma_plugin_sdk::{
    ExpertLayer, MergeStrategy, MergedLayer, Metadata, Params, Plugin, PluginKind,
};

/// The plugin type.
struct Linear;

impl Plugin for Linear {
    fn metadata() -> Metadata {
        Metadata {
            name: "linear".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kind: PluginKind::MergeStrategy,
            description: "Exact weighted sum of the experts' LoRA deltas (the default).".into(),
            help: "merged delta = sum_i w_i * s_i * up_i @ down_i, where s_i = alpha_i / r_i and \
                   w_i is expert i's weight (default 1/K). With no requested rank the result is \
                   exact factors, up = [w_1 s_1 up_1 | ... | w_K s_K up_K] and \
                   down = [down_1; ...; down_K] (rank = sum of the experts' ranks). With a \
                   requested rank the dense delta is returned and the host re-factors it by \
                   truncated SVD. Unlike averaging the A and B factors separately, this has no \
                   cross terms B_i A_j."
                .into(),
            params: vec![],
        }
    }
}

impl MergeStrategy for Linear {
    fn merge_layer(
        layer: String,
        experts_in: Vec<ExpertLayer>,
        rank: Option<u32>,
        _params: Params,
    ) -> Result<MergedLayer, String> {
        let list = experts(&experts_in);
        selma_merge_common::linear(&HostOps, &layer, &list, rank, 1.0).map(into_layer)
    }
}

selma_plugin_sdk::export!(merge_strategy: Linear);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_names_the_plugin() {
        let m = Linear::metadata();
        assert_eq!((m.name.as_str(), m.params.len()), ("linear", 0));
        assert!(matches!(m.kind, PluginKind::MergeStrategy));
    }
}
