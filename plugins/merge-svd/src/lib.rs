//! The `svd` merge strategy: the exact weighted sum of deltas, re-factored
//! to a lower rank by truncated SVD.

use selma_merge_common::sdk::{experts, into_layer, HostOps};
use selma_plugin_sdk::{
    params, ExpertLayer, MergeStrategy, MergedLayer, Metadata, Params, Plugin, PluginKind,
};

/// The plugin type.
struct Svd;

impl Plugin for Svd {
    fn metadata() -> Metadata {
        Metadata {
            name: "svd".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kind: PluginKind::MergeStrategy,
            description:
                "Weighted sum of the experts' deltas, re-factored to a rank by truncated SVD."
                    .into(),
            help: "D = sum_i w_i * s_i * up_i @ down_i (s_i = alpha_i / r_i, w_i the expert \
                   weights, default 1/K); (up, down) = the best rank-r approximation of D by SVD, \
                   singular values split evenly (sqrt) between the factors. r = the `rank` param \
                   if > 0, else the requested rank, else the largest expert rank; clipped to \
                   min(out, in). Like peft's `svd` combination, without its clamp."
                .into(),
            params: vec![params::integer(
                "rank",
                0,
                "rank of the merged factors; 0 = the requested rank, else the largest expert rank",
            )],
        }
    }
}

impl MergeStrategy for Svd {
    fn merge_layer(
        layer: String,
        experts_in: Vec<ExpertLayer>,
        rank: Option<u32>,
        params: Params,
    ) -> Result<MergedLayer, String> {
        let param_rank = params.i64("rank")?;
        let list = experts(&experts_in);
        selma_merge_common::svd(&HostOps, &layer, &list, param_rank, rank).map(into_layer)
    }
}

selma_plugin_sdk::export!(merge_strategy: Svd);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_defaults_parse() {
        let m = Svd::metadata();
        assert_eq!(m.name, "svd");
        assert_eq!(params::defaults(&m.params).i64("rank"), Ok(0));
    }
}
