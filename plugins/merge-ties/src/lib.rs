//! The `ties` merge strategy (TIES-Merging: trim, elect sign, disjoint
//! mean) on the experts' dense deltas.

use selma_merge_common::sdk::{experts, into_layer, HostOps};
use selma_merge_common::{check_density, check_factor};
use selma_plugin_sdk::{
    params, ExpertLayer, MergeStrategy, MergedLayer, Metadata, Params, Plugin, PluginKind,
};

/// The plugin type.
struct Ties;

impl Plugin for Ties {
    fn metadata() -> Metadata {
        Metadata {
            name: "ties".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kind: PluginKind::MergeStrategy,
            description: "TIES-Merging of the experts' deltas: trim, elect sign, disjoint mean.".into(),
            help: "Per layer, on dense deltas tau_i = s_i * up_i @ down_i (s_i = alpha_i / r_i): \
                   1. trim: keep the `density` fraction of each tau_i's entries with the largest \
                   |x|, zero the rest; 2. weight: v_i = (w_i / mean_j w_j) * trimmed tau_i \
                   (weights are relative, so the default 1/K gives the paper's unweighted TIES); \
                   3. elect: per entry, the sign of sum_i v_i; 4. disjoint mean: average the \
                   non-zero v_i with the elected sign (0 if none agrees or the sum is 0); 5. scale by \
                   `lambda`. Returns the dense delta (the host re-factors it to the rank). As \
                   peft's `ties_svd` on deltas (not its per-factor `ties`), except that weights \
                   are normalised and the sign is elected on the weighted values (as mergekit); \
                   equal weights give identical results."
                .into(),
            params: vec![
                params::number(
                    "density",
                    0.2,
                    "fraction of each expert's delta entries kept by magnitude, in (0, 1] (TIES: top 20%)",
                ),
                params::number("lambda", 1.0, "scaling of the merged task vector"),
            ],
        }
    }
}

impl MergeStrategy for Ties {
    fn merge_layer(
        layer: String,
        experts_in: Vec<ExpertLayer>,
        _rank: Option<u32>,
        params: Params,
    ) -> Result<MergedLayer, String> {
        let (density, lambda) = parse(&params)?;
        let list = experts(&experts_in);
        selma_merge_common::ties(&HostOps, &layer, &list, density, lambda).map(into_layer)
    }
}

/// `(density, lambda)`, checked.
fn parse(params: &Params) -> Result<(f32, f32), String> {
    let density = check_density(params.f64("density")?)?;
    let lambda = check_factor("lambda", params.f64("lambda")?)?;
    Ok((density, lambda))
}

selma_plugin_sdk::export!(merge_strategy: Ties);

#[cfg(test)]
mod tests {
    use super::*;
    use selma_plugin_sdk::ParamValue;

    #[test]
    fn declared_defaults_parse() {
        let m = Ties::metadata();
        assert_eq!(m.name, "ties");
        assert_eq!(parse(&params::defaults(&m.params)), Ok((0.2, 1.0)));
    }

    #[test]
    fn out_of_range_density_is_rejected() {
        let p = Params::from_pairs([
            ("density", ParamValue::Number(0.0)),
            ("lambda", ParamValue::Number(1.0)),
        ]);
        assert!(parse(&p).unwrap_err().contains("density"));
    }
}
