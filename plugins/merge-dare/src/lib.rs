//! The `dare` merge strategy (DARE: drop and rescale, then a linear or
//! TIES combination) on the experts' dense deltas, seeded by the host.

use selma_merge_common::sdk::{base_seed, experts, into_layer, HostOps};
use selma_merge_common::{check_drop_rate, check_factor, layer_seed, DareVariant};
use selma_plugin_sdk::{
    params, ExpertLayer, MergeStrategy, MergedLayer, Metadata, Params, Plugin, PluginKind,
};

/// The plugin type.
struct Dare;

impl Plugin for Dare {
    fn metadata() -> Metadata {
        Metadata {
            name: "dare".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kind: PluginKind::MergeStrategy,
            description:
                "DARE: randomly drop delta entries and rescale, then merge linearly or by TIES."
                    .into(),
            help: "Per layer, on dense deltas tau_i = s_i * up_i @ down_i (s_i = alpha_i / r_i): \
                   d_i = tau_i with each entry dropped with probability p = `drop_rate` and the \
                   kept ones scaled by 1 / (1 - p) (unbiased). variant \"linear\" (DARE-linear): \
                   merged = lambda * sum_i w_i d_i (w_i the expert weights, default 1/K). variant \
                   \"ties\" (DARE-TIES): merged = lambda * sign-elect-mean((w_i / mean w) d_i), as \
                   the `ties` plugin without its trim. The drop masks are seeded from the run \
                   seed (the host's random source), the layer name and the expert index, so a \
                   run is reproducible whatever the layer order. Returns the dense delta (the \
                   host re-factors it to the rank). As peft's `dare_linear_svd` / \
                   `dare_ties_svd` with density = 1 - drop_rate."
                .into(),
            params: vec![
                params::number(
                    "drop_rate",
                    0.5,
                    "probability of dropping each delta entry, in [0, 1) (0 = no drop)",
                ),
                params::text(
                    "variant",
                    "linear",
                    "combination after the drop: \"linear\" or \"ties\"",
                ),
                params::number("lambda", 1.0, "scaling of the merged task vector"),
            ],
        }
    }
}

impl MergeStrategy for Dare {
    fn merge_layer(
        layer: String,
        experts_in: Vec<ExpertLayer>,
        _rank: Option<u32>,
        params: Params,
    ) -> Result<MergedLayer, String> {
        let (rate, variant, lambda) = parse(&params)?;
        let base = base_seed();
        let list = experts(&experts_in);
        selma_merge_common::dare(&HostOps, &layer, &list, rate, variant, lambda, |i| {
            layer_seed(base, &layer, i)
        })
        .map(into_layer)
    }
}

/// `(drop_rate, variant, lambda)`, checked.
fn parse(params: &Params) -> Result<(f32, DareVariant, f32), String> {
    let rate = check_drop_rate(params.f64("drop_rate")?)?;
    let variant = DareVariant::parse(params.str("variant")?)?;
    let lambda = check_factor("lambda", params.f64("lambda")?)?;
    Ok((rate, variant, lambda))
}

selma_plugin_sdk::export!(merge_strategy: Dare);

#[cfg(test)]
mod tests {
    use super::*;
    use selma_plugin_sdk::ParamValue;

    #[test]
    fn declared_defaults_parse() {
        let m = Dare::metadata();
        assert_eq!(m.name, "dare");
        assert_eq!(
            parse(&params::defaults(&m.params)),
            Ok((0.5, DareVariant::Linear, 1.0))
        );
    }

    #[test]
    fn ties_variant_and_bad_values() {
        let p = |rate: f64, variant: &str| {
            parse(&Params::from_pairs([
                ("drop_rate", ParamValue::Number(rate)),
                ("variant", ParamValue::Text(variant.into())),
                ("lambda", ParamValue::Number(1.0)),
            ]))
        };
        assert_eq!(p(0.9, "ties"), Ok((0.9, DareVariant::Ties, 1.0)));
        assert!(p(1.0, "linear").unwrap_err().contains("drop_rate"));
        assert!(p(0.5, "mean").unwrap_err().contains("variant"));
    }
}
