//! The report stage. Unit: `report`. Inputs: the results' hash, every
//! adapter's loss log, the config text, the grid settings and the held-out
//! prompts. Runs in an unsharded invocation only. Output: `report.html`
//! (tables, image grids of the first seed, loss curves, the config).

use super::eval::{eval_image_dir, noise_base, prompts_with_seeds, variants, Variant};
use crate::eval::report;
use crate::eval::Results;
use crate::pipeline::driver::{Claim, Counts, Driver, Gate};
use crate::pipeline::store::hash_file;
use crate::pipeline::unit::Unit;
use anyhow::Result;
use serde_json::json;

/// Write report.html from results.json, the eval images and the loss logs.
pub fn run(d: &mut Driver) -> Result<()> {
    let plan = d.plan;
    let Some(up) = d.upstream(&Unit::Report, &[Unit::Results]) else {
        return Ok(());
    };
    let mut losses = vec![];
    for j in plan.train_jobs() {
        let p = plan.dir.expert_run(&j.file).join("loss.jsonl");
        losses.push(if p.is_file() {
            hash_file(&p)?
        } else {
            String::new()
        });
    }
    let eval: Vec<Option<String>> = plan
        .skills
        .iter()
        .map(|s| d.output(&Unit::EvalPrompts(s.id.clone())).map(String::from))
        .collect();
    let input = json!({
        "results": up[0], "losses": losses, "config": plan.loaded.text,
        "grid": plan.loaded.cfg.eval.grid_prompts, "title": plan.loaded.cfg.run.title,
        "eval": eval,
    });
    let Claim::Todo(p) = d.claim(Unit::Report, &input, &[plan.dir.report()], Gate::Unsharded)?
    else {
        return Ok(());
    };
    let results = Results::read(&plan.dir.results())?;
    // The grids show the first seed's images, under the seed-aggregated names.
    let all = variants(plan);
    let first = plan.seeds()[0].0;
    let vs: Vec<&Variant> = all.iter().filter(|v| v.replica.seed == first).collect();
    let noise = noise_base(plan, &vs[0].replica);
    let mut grids = vec![];
    for s in &plan.skills {
        let prompts = prompts_with_seeds(plan, &s.id, noise)?;
        // One image (the first seed) per distinct prompt.
        let rows = prompts
            .iter()
            .enumerate()
            .step_by(s.eval_per_prompt.max(1))
            .take(plan.loaded.cfg.eval.grid_prompts)
            .map(|(i, (p, seed))| report::GridRow {
                prompt: p.clone(),
                seed: *seed,
                images: vs
                    .iter()
                    .map(|v| {
                        (
                            v.group.clone(),
                            eval_image_dir(plan, &v.name, &s.id).join(format!("{i:05}.png")),
                        )
                    })
                    .collect(),
            })
            .collect();
        grids.push(report::Grid {
            skill: s.id.clone(),
            rows,
        });
    }
    let mut loss_curves = vec![];
    for j in plan.train_jobs() {
        let p = plan.dir.expert_run(&j.file).join("loss.jsonl");
        if p.is_file() {
            loss_curves.push(report::LossCurve {
                name: j.unit().to_string(),
                points: report::read_loss_log(&p)?,
            });
        }
    }
    let mut notes = vec![format!(
        "teacher {}, student {}; run seed {}",
        plan.teacher.display(),
        plan.student.display(),
        plan.seed()
    )];
    if let Some(seeds) = &plan.loaded.cfg.run.seeds {
        notes.push(format!(
            "Training, merges and evaluation noise repeated for seeds {seeds:?}: the table shows \
             the mean over seeds with a 95% Student-t interval over seeds (n = seeds); \
             the grids show seed {first}."
        ));
    }
    if plan.loaded.cfg.models.preset().is_some() {
        notes.push(
            "This run may use the tiny random model: its pictures are noise and its scores say \
             nothing about the method. Point [models] at a real diffusers folder for real use."
                .into(),
        );
    }
    let input_report = report::ReportInput {
        title: plan.loaded.cfg.run.title.clone(),
        results,
        grids,
        loss_curves,
        config_toml: plan.loaded.text.clone(),
        notes,
    };
    report::write(&plan.dir.report(), &input_report)?;
    d.finish(p, &hash_file(&plan.dir.report())?, Counts::new())
}
