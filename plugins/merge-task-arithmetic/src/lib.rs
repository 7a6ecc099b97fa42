//! The `task-arithmetic` merge strategy: `lambda` times the exact weighted
//! sum of the experts' LoRA deltas.

use selma_merge_common::check_factor;
use selma_merge_common::sdk::{experts, into_layer, HostOps};
use selma_plugin_sdk::{
    params, ExpertLayer, MergeStrategy, MergedLayer, Metadata, Params, Plugin, PluginKind,
};

/// The plugin type.
struct TaskArithmetic;

impl Plugin for TaskArithmetic {
    fn metadata() -> Metadata {
        Metadata {
            name: "task-arithmetic".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kind: PluginKind::MergeStrategy,
            description: "Task arithmetic: lambda times the weighted sum of the experts' deltas."
                .into(),
            help: "merged delta = lambda * sum_i w_i * s_i * up_i @ down_i (Ilharco et al., \
                   task vectors), with s_i = alpha_i / r_i and w_i the expert weights (default \
                   1/K). Exact: with no requested rank it returns the concatenated factors \
                   up = [lambda w_i s_i up_i ...], down = [down_i; ...] (rank = sum of ranks); \
                   with a requested rank, the dense delta for the host to re-factor by SVD."
                .into(),
            params: vec![params::number(
                "lambda",
                1.0,
                "scaling of the summed task vectors (1.0 with the default weights 1/K = the mean)",
            )],
        }
    }
}

impl MergeStrategy for TaskArithmetic {
    fn merge_layer(
        layer: String,
        experts_in: Vec<ExpertLayer>,
        rank: Option<u32>,
        params: Params,
    ) -> Result<MergedLayer, String> {
        let lambda = check_factor("lambda", params.f64("lambda")?)?;
        let list = experts(&experts_in);
        selma_merge_common::linear(&HostOps, &layer, &list, rank, lambda).map(into_layer)
    }
}

selma_plugin_sdk::export!(merge_strategy: TaskArithmetic);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_defaults_parse() {
        let m = TaskArithmetic::metadata();
        assert_eq!(m.name, "task-arithmetic");
        let p = params::defaults(&m.params);
        assert_eq!(check_factor("lambda", p.f64("lambda").unwrap()), Ok(1.0));
    }
}
