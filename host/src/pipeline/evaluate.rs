//! The eval and report stages: held-out prompts per skill, one image per
//! prompt at fixed seeds for every variant (base, each expert, joint, each
//! merge), scores by every configured scorer, `results.json`, `report.html`.

use super::config::Stage;
use super::plan::{train_unit, Plan};
use super::stages::{bar, load_model, read_rgb, render_png, Ctx};
use super::store::{
    derive_seed, file_safe, hash_file, hash_json, read_jsonl, write_json, Manifest,
};
use crate::eval::scorer::{ClipScorer, ImageFilterScorer, Scorer};
use crate::eval::{stats::mean_ci95, Cell, Results};
use crate::prompts::PromptRecord;
use crate::report;
use anyhow::{ensure, Context, Result};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A model variant under evaluation: its display name and LoRA file.
#[derive(Debug, Clone)]
pub struct Variant {
    /// Display name (`base`, `expert:<skill>`, `joint`, `merged:<name>`).
    pub name: String,
    /// The unit whose output it is (None: the base model).
    pub unit: Option<String>,
    /// The LoRA file applied (None: the base model).
    pub lora: Option<PathBuf>,
}

/// Variants in display order.
pub fn variants(plan: &Plan) -> Vec<Variant> {
    let mut v = vec![Variant {
        name: "base".into(),
        unit: None,
        lora: None,
    }];
    for name in plan.train_units() {
        v.push(Variant {
            name: if name == "joint" {
                "joint".into()
            } else {
                format!("expert:{name}")
            },
            unit: Some(train_unit(&name)),
            lora: Some(plan.dir.expert(&name)),
        });
    }
    for m in &plan.merges {
        v.push(Variant {
            name: format!("merged:{}", m.name),
            unit: Some(format!("merged:{}", m.name)),
            lora: Some(plan.dir.merged(&m.name)),
        });
    }
    v
}

fn eval_seed(plan: &Plan) -> u64 {
    plan.loaded
        .cfg
        .eval
        .seed
        .unwrap_or_else(|| derive_seed(plan.seed(), &["eval"]))
}

/// `eval/prompts/<skill>.jsonl`.
fn eval_prompts_path(plan: &Plan, skill: &str) -> PathBuf {
    plan.dir
        .eval()
        .join("prompts")
        .join(format!("{skill}.jsonl"))
}

/// Read a user's prompt file: JSON lines with `text`, or one prompt per line.
fn read_prompt_file(path: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = vec![];
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() {
            continue;
        }
        if l.starts_with('{') {
            let v: serde_json::Value = serde_json::from_str(l)
                .with_context(|| format!("{}:{}: bad JSON line", path.display(), i + 1))?;
            let t = v["text"]
                .as_str()
                .with_context(|| format!("{}:{}: no \"text\"", path.display(), i + 1))?;
            out.push(t.to_string());
        } else {
            out.push(l.to_string());
        }
    }
    ensure!(!out.is_empty(), "{} holds no prompt", path.display());
    Ok(out)
}

/// Held-out prompts of every skill.
fn eval_prompts(plan: &Plan, ctx: &mut Ctx) -> Result<()> {
    let cfg = &plan.loaded.cfg;
    for s in &plan.skills {
        let unit = format!("eval-prompts:{}", s.id);
        let seed = derive_seed(eval_seed(plan), &["eval-prompts", &s.id]);
        let input = match &s.eval_file {
            Some(f) => hash_json(&json!({"file": hash_file(f)?})),
            None => {
                let Some(train) = ctx.outputs.get(&format!("prompts:{}", s.id)) else {
                    ctx.waiting
                        .push((unit, format!("prompts of {} are not done", s.id)));
                    continue;
                };
                hash_json(&json!({
                    "skill": plan.plugin_id(&s.spec), "generator": [plan.plugin_id(&s.generator), plan.params_json(&s.generator)],
                    "filters": s.filters.iter().map(|f| json!([plan.plugin_id(f), plan.params_json(f)])).collect::<Vec<_>>(),
                    "count": cfg.eval.prompts, "seed": seed, "exclude": train,
                    "max_rounds": cfg.prompts.max_rounds,
                }))
            }
        };
        if let Some(m) =
            plan.dir
                .done_with("eval", &unit, &input, &[eval_prompts_path(plan, &s.id)])
        {
            ctx.outputs.insert(unit, m.output_hash);
            continue;
        }
        if !plan.wants(Stage::Eval) || plan.opts.shard.is_some() {
            ctx.waiting.push((
                unit,
                "evaluation runs in an unsharded run with the eval stage".into(),
            ));
            continue;
        }
        let texts = match &s.eval_file {
            Some(f) => read_prompt_file(f)?,
            None => {
                let train: Vec<PromptRecord> = read_jsonl(&plan.dir.prompts(&s.id))?;
                let exclude: Vec<String> = train.into_iter().map(|r| r.text).collect();
                let job = super::stages::prompts_job(plan, s, seed, cfg.eval.prompts);
                eprintln!("eval: held-out prompts for {}", s.id);
                let out = crate::prompts::run_job_excluding(&job, &exclude, plan.opts.progress)
                    .with_context(|| format!("skill {}: generating held-out prompts", s.id))?;
                ensure!(
                    !out.records.is_empty(),
                    "skill {}: no held-out prompt could be generated apart from the training prompts",
                    s.id
                );
                if !out.complete {
                    eprintln!(
                        "warning: skill {}: {} of {} held-out prompts (the generator ran dry \
                         apart from the training prompts)",
                        s.id,
                        out.records.len(),
                        cfg.eval.prompts
                    );
                }
                out.records.into_iter().map(|r| r.text).collect()
            }
        };
        let rows: Vec<serde_json::Value> = texts.iter().map(|t| json!({"text": t})).collect();
        let path = eval_prompts_path(plan, &s.id);
        super::store::write_jsonl(&path, &rows)?;
        let mut m = Manifest {
            stage: "eval".into(),
            unit: unit.clone(),
            input_hash: input,
            output_hash: hash_file(&path)?,
            done: true,
            counts: BTreeMap::new(),
        };
        m.counts.insert("prompts".into(), texts.len() as f64);
        plan.dir.write_manifest(&m)?;
        ctx.outputs.insert(unit.clone(), m.output_hash);
        ctx.ran.push(unit);
    }
    Ok(())
}

/// The held-out prompts of a skill, with their fixed seeds.
fn prompts_with_seeds(plan: &Plan, skill: &str) -> Result<Vec<(String, u64)>> {
    let rows: Vec<serde_json::Value> = read_jsonl(&eval_prompts_path(plan, skill))?;
    Ok(rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            (
                r["text"].as_str().unwrap_or_default().to_string(),
                derive_seed(eval_seed(plan), &["eval-image", skill, &i.to_string()]),
            )
        })
        .collect())
}

/// `eval/images/<variant>/<skill>/`.
fn eval_image_dir(plan: &Plan, variant: &str, skill: &str) -> PathBuf {
    plan.dir
        .eval()
        .join("images")
        .join(file_safe(variant))
        .join(skill)
}

/// Images and scores of every variant x skill, then results.json.
pub fn eval(plan: &Plan, ctx: &mut Ctx) -> Result<()> {
    eval_prompts(plan, ctx)?;
    let cfg = &plan.loaded.cfg;
    let steps = cfg.eval.steps.unwrap_or(cfg.images.steps);
    let guidance = cfg.eval.guidance.unwrap_or(cfg.images.guidance);
    let student = if plan
        .skills
        .iter()
        .any(|s| ctx.outputs.contains_key(&format!("eval-prompts:{}", s.id)))
    {
        ctx.model_id(plan, &plan.student)?
    } else {
        String::new()
    };
    let scorer_ids: Vec<serde_json::Value> = plan
        .scorers
        .iter()
        .map(|f| json!([plan.plugin_id(f), plan.params_json(f)]))
        .collect();
    let clip_id = match &plan.clip_model {
        Some(d) => json!(super::store::model_identity(d)?),
        None => json!(null),
    };
    let mut scorers: Option<Vec<Box<dyn Scorer>>> = None;
    let mut score_hashes = vec![];
    let mut complete = true;
    for v in variants(plan) {
        let lora_hash = match &v.unit {
            None => json!(null),
            Some(u) => match ctx.outputs.get(u) {
                Some(h) => json!(h),
                None => {
                    ctx.waiting
                        .push((format!("eval:{}", v.name), format!("{u} is not done")));
                    complete = false;
                    continue;
                }
            },
        };
        let mut model = None;
        for s in &plan.skills {
            let unit = format!("scores:{}:{}", v.name, s.id);
            let Some(ph) = ctx.outputs.get(&format!("eval-prompts:{}", s.id)).cloned() else {
                complete = false;
                continue;
            };
            let images_input = hash_json(&json!({
                "student": student, "lora": lora_hash, "prompts": ph, "steps": steps,
                "guidance": guidance, "settings": {
                    "scheduler": cfg.images.scheduler.get_ref(), "eta": cfg.images.eta,
                    "width": cfg.images.width, "height": cfg.images.height,
                    "negative": cfg.images.negative, "dtype": cfg.run.dtype,
                },
                "seed": eval_seed(plan),
            }));
            let input = hash_json(&json!({
                "images": images_input, "scorers": scorer_ids, "clip": clip_id,
            }));
            let score_path = plan
                .dir
                .eval()
                .join("scores")
                .join(file_safe(&v.name))
                .join(format!("{}.json", s.id));
            if let Some(m) = plan.dir.done_with("eval", &unit, &input, &[score_path]) {
                score_hashes.push(m.output_hash.clone());
                ctx.outputs.insert(unit, m.output_hash);
                continue;
            }
            if !plan.wants(Stage::Eval) || plan.opts.shard.is_some() {
                ctx.waiting
                    .push((unit, "the eval stage was not selected".into()));
                complete = false;
                continue;
            }
            // Images: one file each, kept across interruptions while the inputs hold.
            let dir = eval_image_dir(plan, &v.name, &s.id);
            let marker = dir.join(".selma-input");
            if std::fs::read_to_string(&marker)
                .map(|t| t.trim() != images_input)
                .unwrap_or(true)
            {
                if dir.exists() {
                    std::fs::remove_dir_all(&dir)
                        .with_context(|| format!("clearing {}", dir.display()))?;
                }
                super::store::write_atomic(&marker, images_input.as_bytes())?;
            }
            let prompts = prompts_with_seeds(plan, &s.id)?;
            let todo: Vec<usize> = (0..prompts.len())
                .filter(|i| !dir.join(format!("{i:05}.png")).is_file())
                .collect();
            if !todo.is_empty() {
                if model.is_none() {
                    let mut sd = load_model(plan, &plan.student)?;
                    if let Some(l) = &v.lora {
                        let file = selma_lora::LoraFile::load(l, sd.device())
                            .with_context(|| format!("reading {}", l.display()))?;
                        sd.attach_lora(&file, 1.0)
                            .with_context(|| format!("applying {}", l.display()))?;
                    }
                    model = Some(sd);
                }
                let sd = model.as_ref().expect("loaded above");
                let b = bar(plan.opts.progress, todo.len() as u64, "images");
                b.set_message(format!("eval {} {}", v.name, s.id));
                for i in todo {
                    let (p, seed) = &prompts[i];
                    let note = format!("Variant: {}", v.name);
                    render_png(
                        sd,
                        plan,
                        p,
                        *seed,
                        steps,
                        guidance,
                        &dir.join(format!("{i:05}.png")),
                        &note,
                    )?;
                    b.inc(1);
                }
                b.finish_and_clear();
            }
            // Scores.
            if scorers.is_none() {
                scorers = Some(load_scorers(plan)?);
            }
            let sc = scorers.as_mut().expect("loaded above");
            let mut table: BTreeMap<String, Vec<f64>> = BTreeMap::new();
            for (i, (p, _)) in prompts.iter().enumerate() {
                let img = read_rgb(&dir.join(format!("{i:05}.png")))?;
                for scorer in sc.iter_mut() {
                    let x = scorer.score(&img, p)?;
                    table.entry(scorer.name()).or_default().push(x);
                }
            }
            let path = plan
                .dir
                .eval()
                .join("scores")
                .join(file_safe(&v.name))
                .join(format!("{}.json", s.id));
            write_json(&path, &table)?;
            let m = Manifest {
                stage: "eval".into(),
                unit: unit.clone(),
                input_hash: input,
                output_hash: hash_file(&path)?,
                done: true,
                counts: [("images".to_string(), prompts.len() as f64)].into(),
            };
            plan.dir.write_manifest(&m)?;
            score_hashes.push(m.output_hash.clone());
            ctx.outputs.insert(unit.clone(), m.output_hash);
            ctx.ran.push(unit);
        }
    }
    if !complete {
        return Ok(());
    }
    // results.json
    let extra = pass_rate_table(plan);
    let input = hash_json(&json!({"scores": score_hashes, "extra": serde_json::to_value(&extra)?}));
    if let Some(m) = plan.dir.done("eval", "results", &input) {
        if plan.dir.results().is_file() {
            ctx.outputs.insert("results".into(), m.output_hash);
            return Ok(());
        }
    }
    let vs = variants(plan);
    // Scorers in config order (image filters, then CLIPScore).
    let mut scorer_names: Vec<String> = plan
        .scorers
        .iter()
        .map(|f| {
            plan.plugin_names
                .get(f)
                .cloned()
                .unwrap_or_else(|| f.clone())
        })
        .collect();
    scorer_names.dedup();
    let mut cells = vec![];
    for v in &vs {
        for s in &plan.skills {
            let path = plan
                .dir
                .eval()
                .join("scores")
                .join(file_safe(&v.name))
                .join(format!("{}.json", s.id));
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let table: BTreeMap<String, Vec<f64>> = serde_json::from_str(&text)?;
            for name in table.keys() {
                if !scorer_names.contains(name) {
                    scorer_names.push(name.clone());
                }
            }
            for name in &scorer_names {
                let Some(xs) = table.get(name) else { continue };
                let (mean, lo, hi) = mean_ci95(xs);
                cells.push(Cell {
                    variant: v.name.clone(),
                    skill: s.id.clone(),
                    scorer: name.clone(),
                    mean,
                    lo,
                    hi,
                    n: xs.len(),
                });
            }
        }
    }
    let results = Results {
        variants: vs.iter().map(|v| v.name.clone()).collect(),
        skills: plan.skills.iter().map(|s| s.id.clone()).collect(),
        scorers: scorer_names,
        cells,
        extra: vec![extra],
    };
    results.write(&plan.dir.results())?;
    let m = Manifest {
        stage: "eval".into(),
        unit: "results".into(),
        input_hash: input,
        output_hash: hash_file(&plan.dir.results())?,
        done: true,
        counts: [("cells".to_string(), results.cells.len() as f64)].into(),
    };
    plan.dir.write_manifest(&m)?;
    ctx.outputs.insert("results".into(), m.output_hash);
    ctx.ran.push("results".into());
    Ok(())
}

fn load_scorers(plan: &Plan) -> Result<Vec<Box<dyn Scorer>>> {
    let rt = plan.runtime(derive_seed(plan.seed(), &["scorers"]))?;
    let mut out: Vec<Box<dyn Scorer>> = vec![];
    for f in &plan.scorers {
        let p = rt
            .image_filter(f)
            .with_context(|| format!("loading scorer {f:?}"))?;
        let params = p.params_toml(&plan.params_of(f))?;
        out.push(Box::new(ImageFilterScorer::new(p, params)));
    }
    if let Some(d) = &plan.clip_model {
        let device = selma_diffusion::pipeline::parse_device(&plan.loaded.cfg.run.device)?;
        out.push(Box::new(
            ClipScorer::load(d, &device)
                .with_context(|| format!("loading CLIP {}", d.display()))?,
        ));
    }
    Ok(out)
}

/// Self-generation pass rates per skill (the image filters' verdicts).
fn pass_rate_table(plan: &Plan) -> report::Table {
    let mut header = vec![
        "skill".to_string(),
        "prompts".into(),
        "images".into(),
        "kept".into(),
        "pass rate".into(),
    ];
    let filter_names: Vec<String> = plan
        .image_filters
        .iter()
        .map(|f| {
            plan.plugin_names
                .get(f)
                .cloned()
                .unwrap_or_else(|| f.clone())
        })
        .collect();
    header.extend(filter_names.iter().map(|n| format!("pass rate {n}")));
    let mut rows = vec![];
    for s in &plan.skills {
        let p = plan.dir.manifest("prompts", &format!("prompts:{}", s.id));
        let f = plan.dir.manifest("images", &format!("filter:{}", s.id));
        let c = |m: &Option<Manifest>, k: &str| -> Option<f64> {
            m.as_ref().and_then(|m| m.counts.get(k).copied())
        };
        let fmt_n = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.0}"));
        let fmt_p = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{:.1}%", 100.0 * v));
        let mut row = vec![
            s.id.clone(),
            fmt_n(c(&p, "prompts")),
            fmt_n(c(&f, "generated")),
            fmt_n(c(&f, "kept")),
            fmt_p(c(&f, "pass_rate")),
        ];
        for n in &filter_names {
            row.push(fmt_p(c(&f, &format!("pass_rate:{n}"))));
        }
        rows.push(row);
    }
    report::Table {
        title: "Self-generated training data: image-filter pass rates".into(),
        header,
        rows,
    }
}

/// Write report.html from results.json, the eval images and the loss logs.
pub fn write_report(plan: &Plan, ctx: &mut Ctx) -> Result<()> {
    let Some(results_hash) = ctx.outputs.get("results").cloned() else {
        ctx.waiting
            .push(("report".into(), "results.json is not done".into()));
        return Ok(());
    };
    let mut losses = vec![];
    for name in plan.train_units() {
        let p = plan.dir.expert_run(&name).join("loss.jsonl");
        losses.push(if p.is_file() {
            hash_file(&p)?
        } else {
            String::new()
        });
    }
    let input = hash_json(&json!({
        "results": results_hash, "losses": losses, "config": plan.loaded.text,
        "grid": plan.loaded.cfg.eval.grid_prompts, "title": plan.loaded.cfg.run.title,
        "eval": plan.skills.iter().map(|s| ctx.outputs.get(&format!("eval-prompts:{}", s.id))).collect::<Vec<_>>(),
    }));
    if plan.dir.done("report", "report", &input).is_some() && plan.dir.report().is_file() {
        return Ok(());
    }
    if !plan.wants(Stage::Report) || plan.opts.shard.is_some() {
        ctx.waiting
            .push(("report".into(), "the report stage was not selected".into()));
        return Ok(());
    }
    let results = Results::read(&plan.dir.results())?;
    let vs = variants(plan);
    let mut grids = vec![];
    for s in &plan.skills {
        let prompts = prompts_with_seeds(plan, &s.id)?;
        let rows = prompts
            .iter()
            .enumerate()
            .take(plan.loaded.cfg.eval.grid_prompts)
            .map(|(i, (p, seed))| report::GridRow {
                prompt: p.clone(),
                seed: *seed,
                images: vs
                    .iter()
                    .map(|v| {
                        (
                            v.name.clone(),
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
    for name in plan.train_units() {
        let p = plan.dir.expert_run(&name).join("loss.jsonl");
        if p.is_file() {
            loss_curves.push(report::LossCurve {
                name: if name == "joint" {
                    name.clone()
                } else {
                    format!("expert:{name}")
                },
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
    if plan.loaded.cfg.models.init_tiny {
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
    plan.dir.write_manifest(&Manifest {
        stage: "report".into(),
        unit: "report".into(),
        input_hash: input,
        output_hash: hash_file(&plan.dir.report())?,
        done: true,
        counts: BTreeMap::new(),
    })?;
    ctx.ran.push("report".into());
    Ok(())
}
