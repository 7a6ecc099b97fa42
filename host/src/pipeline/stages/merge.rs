//! The merge stage. Units: `merged:<name>` per `[[merge]]` entry and
//! replica. Inputs: the strategy plugin's identity and parameters, the
//! weights, the output rank, the experts' output hashes, the seed and the
//! LoRA format. Runs in an unsharded invocation only. Output:
//! `merged/<name>.safetensors`.

use crate::pipeline::driver::{Claim, Counts, Driver, Gate};
use crate::pipeline::store::{derive_seed, hash_file};
use crate::pipeline::unit::{Tag, Unit};
use anyhow::{Context, Result};
use serde_json::json;
use std::path::PathBuf;

/// Merge the experts with every configured strategy.
pub fn run(d: &mut Driver) -> Result<()> {
    let plan = d.plan;
    let cfg = &plan.loaded.cfg;
    for (r, mp) in plan
        .replicas()
        .into_iter()
        .flat_map(|r| plan.merges.iter().map(move |m| (r, m)))
    {
        let tag = Tag::of(&r);
        let unit = Unit::Merged(mp.name.clone(), tag);
        let file = format!("{}{}", mp.name, r.file_suffix());
        let experts: Vec<Unit> = plan
            .skills
            .iter()
            .map(|s| Unit::Expert(s.id.clone(), tag))
            .collect();
        let Some(expert_hashes) = d.upstream(&unit, &experts) else {
            continue;
        };
        let seed = derive_seed(plan.replica_seed(&r), &["merge", &mp.name]);
        let input = json!({
            "strategy": plan.plugin_id(&mp.spec), "params": serde_json::to_value(&mp.params)?,
            "weights": mp.weights, "rank": mp.rank, "experts": expert_hashes, "seed": seed,
            "format": cfg.train.format,
        });
        let out_path = plan.dir.merged(&file);
        let Claim::Todo(p) = d.claim(
            unit,
            &input,
            std::slice::from_ref(&out_path),
            Gate::Unsharded,
        )?
        else {
            continue;
        };
        eprintln!(
            "merge: {} experts with {} ({})",
            plan.skills.len(),
            mp.name,
            p.unit
        );
        let paths: Vec<PathBuf> = plan
            .skills
            .iter()
            .map(|s| plan.dir.expert(&format!("{}{}", s.id, r.file_suffix())))
            .collect();
        let inputs = crate::merge::load_inputs(&paths)?;
        let rt = plan.runtime(seed)?;
        let plugin = rt
            .merge_strategy(&mp.spec)
            .with_context(|| format!("loading merge strategy {:?}", mp.spec))?;
        let params = plugin.params_toml(&mp.params)?;
        let mut merger = crate::merge::PluginMerger { plugin, params };
        let merged = crate::merge::merge(
            &inputs,
            &mut merger,
            &crate::merge::MergeOptions {
                weights: mp.weights.clone(),
                rank: mp.rank,
                progress: plan.opts.progress,
            },
        )
        .with_context(|| format!("merging with {}", mp.name))?;
        if let Some(dir) = out_path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let fmt: selma_lora::LoraFormat = cfg.train.format.parse()?;
        merged
            .save(&out_path, fmt)
            .with_context(|| format!("writing {}", out_path.display()))?;
        let counts = Counts::from([("layers".into(), merged.layers.len() as f64)]);
        d.finish(p, &hash_file(&out_path)?, counts)?;
    }
    Ok(())
}
