//! `scaled-linear`: a merge strategy written only against the SDK, outside
//! the bundled set. It merges like `linear` (the exact weighted sum of the
//! experts' deltas) and multiplies the result by the `gain` parameter:
//! merged = gain * sum_i w_i * s_i * up_i @ down_i.

use selma_plugin_sdk::{
    params, tensor, ExpertLayer, MergeStrategy, MergedLayer, Metadata, Params, Plugin, PluginKind,
    Tensor,
};

/// The plugin type.
struct ScaledLinear;

impl Plugin for ScaledLinear {
    fn metadata() -> Metadata {
        Metadata {
            name: "scaled-linear".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kind: PluginKind::MergeStrategy,
            description: "Test strategy: the linear merge times `gain`.".into(),
            help: "merged delta = gain * sum_i w_i * s_i * up_i @ down_i (s_i = alpha_i / r_i). \
                   Exact factors [gain w_i s_i up_i ...] x [down_i; ...] without a requested \
                   rank, the dense delta with one."
                .into(),
            params: vec![params::number(
                "gain",
                1.0,
                "factor applied to the linear merge",
            )],
        }
    }
}

impl MergeStrategy for ScaledLinear {
    fn merge_layer(
        layer: String,
        experts: Vec<ExpertLayer>,
        rank: Option<u32>,
        params: Params,
    ) -> Result<MergedLayer, String> {
        let gain = params.f32("gain")?;
        if experts.is_empty() {
            return Err(format!("layer {layer}: no experts to merge"));
        }
        let ups: Vec<Tensor> = experts
            .iter()
            .map(|e| e.up.scale(gain * e.weight * e.scale))
            .collect();
        let up = tensor::concat(&ups.iter().collect::<Vec<_>>(), 1)
            .map_err(|e| format!("layer {layer}: concatenating up factors: {e}"))?;
        let down = tensor::concat(&experts.iter().map(|e| &e.down).collect::<Vec<_>>(), 0)
            .map_err(|e| format!("layer {layer}: concatenating down factors: {e}"))?;
        match rank {
            None => Ok(MergedLayer::Factors((up, down))),
            Some(_) => up
                .matmul(&down)
                .map(MergedLayer::Delta)
                .map_err(|e| format!("layer {layer}: up @ down: {e}")),
        }
    }
}

selma_plugin_sdk::export!(merge_strategy: ScaledLinear);
