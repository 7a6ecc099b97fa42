//! `selma merge`: merge LoRA experts (peft or kohya files) into one LoRA with
//! a merge-strategy plugin (bundled name or `.wasm` path) or, with
//! `--native`, the same strategy written natively in Rust.

use crate::merge::{load_inputs, merge, LayerMerger, MergeOptions, NativeMerger, PluginMerger};
use anyhow::{bail, Context, Result};
use clap::Args;
use selma_lora::LoraFormat;
use selma_runtime::{Runtime, RuntimeConfig};
use std::path::PathBuf;

/// Merge LoRA experts with a merge-strategy plugin.
///
/// Every file must adapt the same layers; ranks may differ (each layer is
/// merged in delta space, scale_i * up_i @ down_i). A strategy that returns a
/// dense delta is re-factored by SVD to --rank (default: the layer's largest
/// expert rank); returned factors keep their rank unless --rank is smaller.
/// So `linear` and `cat` without --rank are exact (rank = sum of the expert
/// ranks). The output has alpha = rank (scale 1).
#[derive(Args, Debug)]
pub struct MergeArgs {
    /// The LoRA files to merge (peft/diffusers or kohya safetensors, auto-detected).
    #[arg(required = true, value_name = "LORA.safetensors")]
    pub loras: Vec<PathBuf>,
    /// Merge strategy: a bundled plugin (linear, cat, svd, ties, dare,
    /// task-arithmetic) or the path of a merge-strategy .wasm component.
    #[arg(long, value_name = "NAME|FILE.wasm")]
    pub strategy: String,
    /// One weight per file, comma-separated (default 1/K each).
    #[arg(long, value_delimiter = ',', value_name = "W,...")]
    pub weights: Option<Vec<f32>>,
    /// A strategy parameter (repeatable): `KEY=VALUE`, e.g. density=0.2, or
    /// `STRATEGY.KEY=VALUE` as `selma prompts` and `plugins inspect` write it
    /// (e.g. ties.density=0.2).
    #[arg(long = "param", value_name = "[STRATEGY.]KEY=VALUE")]
    pub params: Vec<String>,
    /// Rank of the merged LoRA (see above for the default).
    #[arg(long, value_name = "R")]
    pub rank: Option<usize>,
    /// Layout of the output file.
    #[arg(long, default_value = "peft", value_name = "peft|kohya")]
    pub format: LoraFormat,
    /// Output file, written atomically.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Seed of the plugin's random source (e.g. dare's drop masks).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Seconds a plugin may spend on one layer.
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    pub layer_timeout: u64,
    /// Use the native Rust implementation of the named bundled strategy
    /// instead of the plugin (a reference; dare then takes `seed=` as a param).
    #[arg(long)]
    pub native: bool,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Split `[strategy.]key=value` parameters; a prefix must be the
/// strategy's name (`own`).
fn parse_params(raw: &[String], own: &str) -> Result<Vec<(String, String)>> {
    raw.iter()
        .map(|p| {
            let Some((k, v)) = p.split_once('=').filter(|(k, _)| !k.trim().is_empty()) else {
                bail!("--param {p:?} is not KEY=VALUE (e.g. --param density=0.2)");
            };
            let k = k.trim();
            let key = match k.split_once('.') {
                Some((plugin, key)) if plugin == own && !key.is_empty() => key,
                Some((plugin, _)) => bail!(
                    "--param {p:?} names plugin {plugin:?}, but the strategy is {own:?}: \
                     write {own}.KEY=VALUE or KEY=VALUE"
                ),
                None => k,
            };
            Ok((key.to_string(), v.to_string()))
        })
        .collect()
}

/// Run `selma merge`.
pub fn run(args: MergeArgs) -> Result<()> {
    let inputs = load_inputs(&args.loras)?;
    let mut merger: Box<dyn LayerMerger> = if args.native {
        let params = parse_params(&args.params, &args.strategy)?;
        Box::new(NativeMerger::new(&args.strategy, &params)?)
    } else {
        let runtime = Runtime::new(RuntimeConfig {
            seed: args.seed,
            call_timeout: std::time::Duration::from_secs(args.layer_timeout.max(1)),
            ..RuntimeConfig::default()
        })?;
        let plugin = runtime.merge_strategy(&args.strategy)?;
        let params = parse_params(&args.params, plugin.name())?;
        Box::new(PluginMerger::new(plugin, &params)?)
    };
    let opts = MergeOptions {
        weights: args.weights.clone(),
        rank: args.rank,
        progress: !args.quiet,
    };
    let merged = merge(&inputs, merger.as_mut(), &opts)?;
    merged
        .save(&args.out, args.format)
        .with_context(|| format!("writing the merged LoRA to {}", args.out.display()))?;
    let ranks: Vec<usize> = merged.layers.values().map(|l| l.rank()).collect();
    eprintln!(
        "merged {} files ({} layers, rank {}..{}) with {} into {}",
        inputs.len(),
        merged.layers.len(),
        ranks.iter().min().unwrap_or(&0),
        ranks.iter().max().unwrap_or(&0),
        merger.name(),
        args.out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_take_an_optional_prefix_naming_the_strategy() {
        let raw = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let want = vec![
            ("density".to_string(), "0.2".to_string()),
            ("k".to_string(), "a=b".to_string()),
        ];
        assert_eq!(
            parse_params(&raw(&["density=0.2", "k=a=b"]), "ties").unwrap(),
            want
        );
        assert_eq!(
            parse_params(&raw(&["ties.density=0.2", "ties.k=a=b"]), "ties").unwrap(),
            want
        );
        let e = parse_params(&raw(&["dare.density=0.2"]), "ties")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("names plugin \"dare\", but the strategy is \"ties\""),
            "{e}"
        );
        for bad in ["density", "=1", "ties.=1"] {
            assert!(parse_params(&raw(&[bad]), "ties").is_err(), "{bad}");
        }
    }
}
