//! The prompts stage. Units: `prompts:<skill>`, one per skill. Inputs: the
//! skill, generator and prompt-filter plugins with their parameters, the
//! count, the round limit, the skill's seed and the LLM endpoint. Work: run
//! the generator and filters until `count` prompts are accepted; outputs
//! `<skill>/prompts.jsonl` and its stats (the loop's state is kept in
//! `<skill>/prompts.partial.json` until then). Any invocation may run it (it is
//! deterministic), sharded or not.

use crate::pipeline::driver::{Claim, Counts, Driver, Gate};
use crate::pipeline::plan::{Plan, SkillPlan};
use crate::pipeline::store::{derive_seed, hash_file};
use crate::pipeline::unit::Unit;
use crate::prompts::PromptsJob;
use anyhow::{ensure, Context, Result};
use serde_json::json;

/// The identity of a skill's prompt sources (skill, generator and filters
/// with their parameters), shared by training and held-out prompts.
pub fn sources(
    plan: &Plan,
    s: &SkillPlan,
) -> (serde_json::Value, serde_json::Value, serde_json::Value) {
    (
        json!(plan.plugin_id(&s.spec)),
        json!([plan.plugin_id(&s.generator), plan.params_json(&s.generator)]),
        json!(s
            .filters
            .iter()
            .map(|f| json!([plan.plugin_id(f), plan.params_json(f)]))
            .collect::<Vec<_>>()),
    )
}

/// Generate every skill's prompts.
pub fn run(d: &mut Driver) -> Result<()> {
    let plan = d.plan;
    let cfg = &plan.loaded.cfg;
    for s in &plan.skills {
        let unit = Unit::Prompts(s.id.clone());
        let seed = derive_seed(plan.seed(), &["prompts", &s.id]);
        let (skill, generator, filters) = sources(plan, s);
        let input = json!({
            "skill": skill, "generator": generator, "filters": filters,
            "skill_params": plan.params_json(&s.spec),
            "count": s.count,
            "max_rounds": cfg.prompts.max_rounds,
            "seed": seed,
            "llm": cfg.llm.as_ref().map(|l| json!([l.endpoint, l.model, l.chat])),
        });
        let path = plan.dir.prompts(&s.id);
        let Claim::Todo(p) = d.claim(unit, &input, std::slice::from_ref(&path), Gate::Selected)?
        else {
            continue;
        };
        let mut job = job(plan, s, seed, s.count);
        let checkpoint = crate::prompts::Checkpoint {
            path: plan.dir.skill_dir(&s.id).join("prompts.partial.json"),
            key: p.input.clone(),
        };
        job.checkpoint = Some(checkpoint.clone());
        eprintln!("prompts: {} ({} wanted)", s.id, s.count);
        let out = crate::prompts::run_job(&job, plan.opts.progress)
            .with_context(|| format!("skill {}: generating prompts", s.id))?;
        ensure!(
            !out.records.is_empty(),
            "skill {}: the generator and filters accepted no prompt in {} rounds",
            s.id,
            out.stats.rounds
        );
        if !out.complete {
            eprintln!(
                "warning: skill {}: {} of {} prompts (the generator ran dry{})",
                s.id,
                out.records.len(),
                s.count,
                if out.stats.stalled { ", stalled" } else { "" }
            );
        }
        selma_io::write_jsonl(&path, &out.records)?;
        selma_io::write_json(
            &plan.dir.skill_dir(&s.id).join("prompts.stats.json"),
            &out.stats,
        )?;
        checkpoint.remove()?;
        let counts = Counts::from([
            ("prompts".into(), out.records.len() as f64),
            ("wanted".into(), s.count as f64),
            ("rounds".into(), out.stats.rounds as f64),
        ]);
        d.finish(p, &hash_file(&path)?, counts)?;
    }
    Ok(())
}

/// The prompts job of a skill.
pub fn job(plan: &Plan, s: &SkillPlan, seed: u64, count: usize) -> PromptsJob {
    let mut params = plan.params_strings(&s.generator);
    for f in &s.filters {
        params.extend(plan.params_strings(f));
    }
    params.extend(plan.params_strings(&s.spec));
    params.sort();
    params.dedup();
    PromptsJob {
        skill: s.spec.clone(),
        generator: s.generator.clone(),
        filters: s.filters.clone(),
        params,
        count,
        max_rounds: plan.loaded.cfg.prompts.max_rounds,
        seed,
        llm: plan.llm.clone(),
        llm_grants: plan
            .loaded
            .cfg
            .llm
            .as_ref()
            .map(|l| l.grants.clone())
            .unwrap_or_default(),
        checkpoint: None,
    }
}
