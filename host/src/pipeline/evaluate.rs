//! The eval and report stages: held-out prompts per skill, one image per
//! prompt at fixed seeds for every variant (base, each expert, joint, each
//! merge), scores by every configured scorer, `results.json`, `report.html`.

use super::config::Stage;
use super::plan::{train_unit, Plan, Replica};
use super::stages::{bar, load_model, read_rgb, render_png, run_parallel, samplers, Ctx};
use super::store::{
    derive_seed, file_safe, hash_file, hash_json, read_jsonl, write_json, Manifest,
};
use crate::eval::scorer::{ClipScorer, ImageFilterScorer, Scorer};
use crate::eval::stats::{mean_ci95, mean_ci95_t, mean_of_means_ci95};
use crate::eval::{Cell, Results};
use crate::prompts::PromptRecord;
use crate::report;
use anyhow::{ensure, Context, Result};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A model variant under evaluation: its display name and LoRA file.
#[derive(Debug, Clone)]
pub struct Variant {
    /// Display name (`base`, `expert:<skill>`, `joint`, `merged:<name>`;
    /// `/unfiltered` and `@seed<N>` appended in ablations and multi-seed runs).
    pub name: String,
    /// The unit whose output it is (None: the base model).
    pub unit: Option<String>,
    /// The LoRA file applied (None: the base model).
    pub lora: Option<PathBuf>,
    /// The seed-aggregated name (`name` without `@seed<N>`).
    pub group: String,
    /// The replica (seed and data setting) it belongs to.
    pub replica: Replica,
}

/// Variants in display order, seed by seed: base, then per data setting
/// (filtered, then unfiltered) each expert, joint and each merge.
pub fn variants(plan: &Plan) -> Vec<Variant> {
    let mut v = vec![];
    let replicas = plan.replicas();
    for (seed, tagged) in plan.seeds() {
        let base = Replica {
            seed,
            tagged,
            unfiltered: false,
        };
        v.push(Variant {
            name: format!("base{}", base.seed_suffix()),
            unit: None,
            lora: None,
            group: "base".into(),
            replica: base,
        });
        for r in replicas.iter().filter(|r| r.seed == seed) {
            for name in plan.train_units() {
                let display = if name == "joint" {
                    "joint".to_string()
                } else {
                    format!("expert:{name}")
                };
                v.push(Variant {
                    name: format!("{display}{}", r.suffix()),
                    unit: Some(format!("{}{}", train_unit(&name), r.suffix())),
                    lora: Some(plan.dir.expert(&format!("{name}{}", r.file_suffix()))),
                    group: format!("{display}{}", r.group_suffix()),
                    replica: *r,
                });
            }
            for m in &plan.merges {
                v.push(Variant {
                    name: format!("merged:{}{}", m.name, r.suffix()),
                    unit: Some(format!("merged:{}{}", m.name, r.suffix())),
                    lora: Some(plan.dir.merged(&format!("{}{}", m.name, r.file_suffix()))),
                    group: format!("merged:{}{}", m.name, r.group_suffix()),
                    replica: *r,
                });
            }
        }
    }
    v
}

/// Seed-aggregated variant names in display order: base, filtered variants,
/// then unfiltered ones.
pub fn groups(plan: &Plan) -> Vec<String> {
    let mut out: Vec<String> = vec![];
    let vs = variants(plan);
    for unfiltered in [false, true] {
        for v in &vs {
            if v.replica.unfiltered == unfiltered && !out.contains(&v.group) {
                out.push(v.group.clone());
            }
        }
    }
    out
}

/// Does this run show the ablation table (`[run] seeds` or `ablate_filters`)?
pub fn ablation_mode(plan: &Plan) -> bool {
    plan.loaded.cfg.run.seeds.is_some() || plan.loaded.cfg.images.ablate_filters
}

/// The seed evaluation-image noise derives from, for a replica: the eval
/// seed itself when seeds are not configured, else one per seed.
fn noise_base(plan: &Plan, r: &Replica) -> u64 {
    if r.tagged {
        derive_seed(eval_seed(plan), &["seed", &r.seed.to_string()])
    } else {
        eval_seed(plan)
    }
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

/// The held-out prompts of a skill, with their fixed seeds: one entry per
/// evaluation image (`per_prompt` consecutive entries per prompt when > 1).
fn prompts_with_seeds(plan: &Plan, skill: &str, noise: u64) -> Result<Vec<(String, u64)>> {
    let rows: Vec<serde_json::Value> = read_jsonl(&eval_prompts_path(plan, skill))?;
    let k = plan
        .skills
        .iter()
        .find(|s| s.id == skill)
        .map_or(1, |s| s.eval_per_prompt);
    let mut out = vec![];
    for (i, r) in rows.iter().enumerate() {
        let text = r["text"].as_str().unwrap_or_default().to_string();
        for j in 0..k {
            let seed = if k == 1 {
                derive_seed(noise, &["eval-image", skill, &i.to_string()])
            } else {
                derive_seed(
                    noise,
                    &["eval-image", skill, &i.to_string(), &j.to_string()],
                )
            };
            out.push((text.clone(), seed));
        }
    }
    Ok(out)
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
                "seed": noise_base(plan, &v.replica),
            }));
            let images_input = if s.eval_per_prompt > 1 {
                hash_json(&json!([images_input, s.eval_per_prompt]))
            } else {
                images_input
            };
            let input = hash_json(&json!({
                "images": images_input, "scorers": scorer_ids, "clip": clip_id,
                "metrics": ["score", "accuracy"],
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
            let prompts = prompts_with_seeds(plan, &s.id, noise_base(plan, &v.replica))?;
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
                let note = format!("Variant: {}", v.name);
                run_parallel(samplers(plan, sd), &todo, |&i| {
                    let (p, seed) = &prompts[i];
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
                    Ok(())
                })?;
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
                    for (column, x) in scorer.metrics(&img, p)? {
                        table.entry(column).or_default().push(x);
                    }
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
    let mut input_json = json!({"scores": score_hashes, "extra": serde_json::to_value(&extra)?});
    if ablation_mode(plan) {
        input_json["ablation"] = json!(groups(plan));
    }
    let input = hash_json(&input_json);
    if let Some(m) = plan.dir.done("eval", "results", &input) {
        if plan.dir.results().is_file() {
            ctx.outputs.insert("results".into(), m.output_hash);
            return Ok(());
        }
    }
    let vs = variants(plan);
    // Scorers in config order (each image filter's accuracy and score, then
    // CLIPScore).
    let mut scorer_names: Vec<String> = plan
        .scorers
        .iter()
        .flat_map(|f| {
            let name = plan
                .plugin_names
                .get(f)
                .cloned()
                .unwrap_or_else(|| f.clone());
            [crate::eval::scorer::accuracy_column(&name), name]
        })
        .collect();
    scorer_names.dedup();
    let mut cells = vec![];
    // Per-prompt scores by (variant, skill, scorer), for the means over skills.
    let mut raw: BTreeMap<(String, String, String), Vec<f64>> = BTreeMap::new();
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
                raw.insert((v.name.clone(), s.id.clone(), name.clone()), xs.clone());
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
    let results = if ablation_mode(plan) {
        ablation_results(plan, &vs, scorer_names, cells, &raw, extra)
    } else {
        Results {
            variants: vs.iter().map(|v| v.name.clone()).collect(),
            skills: plan.skills.iter().map(|s| s.id.clone()).collect(),
            scorers: scorer_names,
            cells,
            extra: vec![extra],
        }
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

/// The title every ablation table starts with.
pub const ABLATION_TITLE: &str = "Ablation";

/// `0.550 [0.500, 0.600]`.
fn fmt_ci(c: &Cell) -> String {
    if c.mean.is_finite() {
        format!("{:.3} [{:.3}, {:.3}]", c.mean, c.lo, c.hi)
    } else {
        "n/a".into()
    }
}

/// results.json of an ablation or multi-seed run: cells per seed-aggregated
/// variant (mean over seeds, Student-t 95% interval over seeds, `n` = seeds;
/// with one untagged seed, the per-prompt cells), cells of skill `mean` (the
/// mean over skills), one ablation table per scorer, and with seeds a
/// per-seed breakdown table.
fn ablation_results(
    plan: &Plan,
    vs: &[Variant],
    scorers: Vec<String>,
    per_variant: Vec<Cell>,
    raw: &BTreeMap<(String, String, String), Vec<f64>>,
    pass_rates: report::Table,
) -> Results {
    let skills: Vec<String> = plan.skills.iter().map(|s| s.id.clone()).collect();
    let tagged = plan.loaded.cfg.run.seeds.is_some();
    // Per concrete variant: the mean over skills.
    let mut per_variant = per_variant;
    for v in vs {
        for sc in &scorers {
            let groups: Vec<Vec<f64>> = skills
                .iter()
                .filter_map(|s| raw.get(&(v.name.clone(), s.clone(), sc.clone())).cloned())
                .collect();
            if groups.len() != skills.len() {
                continue;
            }
            let (mean, lo, hi) = mean_of_means_ci95(&groups);
            per_variant.push(Cell {
                variant: v.name.clone(),
                skill: "mean".into(),
                scorer: sc.clone(),
                mean,
                lo,
                hi,
                n: groups.iter().map(|g| g.len()).sum(),
            });
        }
    }
    let group_names = groups(plan);
    let mut columns = skills.clone();
    columns.push("mean".into());
    let cells: Vec<Cell> = if !tagged {
        per_variant.clone()
    } else {
        let mut out = vec![];
        for g in &group_names {
            for s in &columns {
                for sc in &scorers {
                    let xs: Vec<f64> = vs
                        .iter()
                        .filter(|v| &v.group == g)
                        .filter_map(|v| {
                            per_variant
                                .iter()
                                .find(|c| c.variant == v.name && &c.skill == s && &c.scorer == sc)
                        })
                        .map(|c| c.mean)
                        .collect();
                    if xs.is_empty() {
                        continue;
                    }
                    let (mean, lo, hi) = mean_ci95_t(&xs);
                    out.push(Cell {
                        variant: g.clone(),
                        skill: s.clone(),
                        scorer: sc.clone(),
                        mean,
                        lo,
                        hi,
                        n: xs.len(),
                    });
                }
            }
        }
        out
    };
    let n_seeds = plan.seeds().len();
    let mut extra = vec![pass_rates];
    for sc in &scorers {
        let mut header = vec!["variant".to_string()];
        header.extend(skills.iter().cloned());
        header.push("mean over skills".into());
        let rows = group_names
            .iter()
            .map(|g| {
                let mut row = vec![g.clone()];
                for s in &columns {
                    row.push(
                        cells
                            .iter()
                            .find(|c| &c.variant == g && &c.skill == s && &c.scorer == sc)
                            .map_or("-".into(), fmt_ci),
                    );
                }
                row
            })
            .collect();
        extra.push(report::Table {
            title: format!(
                "{ABLATION_TITLE} ({sc}): mean with 95% interval {}",
                if tagged {
                    format!("over {n_seeds} seed(s) (Student t)")
                } else {
                    "over prompts".into()
                }
            ),
            header,
            rows,
        });
    }
    if tagged {
        let header = [
            "variant", "seed", "skill", "scorer", "mean", "lo", "hi", "n",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let rows = per_variant
            .iter()
            .map(|c| {
                let v = vs.iter().find(|v| v.name == c.variant);
                vec![
                    v.map_or(c.variant.clone(), |v| v.group.clone()),
                    v.map_or(String::new(), |v| v.replica.seed.to_string()),
                    c.skill.clone(),
                    c.scorer.clone(),
                    format!("{:.6}", c.mean),
                    format!("{:.6}", c.lo),
                    format!("{:.6}", c.hi),
                    c.n.to_string(),
                ]
            })
            .collect();
        extra.push(report::Table {
            title: "Per-seed breakdown (mean and 95% interval over prompts)".into(),
            header,
            rows,
        });
    }
    Results {
        variants: group_names,
        skills,
        scorers,
        cells,
        extra,
    }
}

/// The ablation tables of a results.json as aligned text (for stdout).
pub fn ablation_text(results: &Results) -> Option<String> {
    let tables: Vec<&report::Table> = results
        .extra
        .iter()
        .filter(|t| t.title.starts_with(ABLATION_TITLE) || t.title.contains("pass rates"))
        .collect();
    tables_text(&tables)
}

/// The results of a run without ablation as text: per scorer a table of
/// variants x skills (mean [95% interval]), then the pass-rate table.
pub fn results_text(results: &Results) -> Option<String> {
    let mut own = vec![];
    for scorer in &results.scorers {
        let mut header = vec!["variant".to_string()];
        header.extend(results.skills.iter().cloned());
        let rows = results
            .variants
            .iter()
            .map(|v| {
                let mut row = vec![v.clone()];
                row.extend(results.skills.iter().map(|s| {
                    results
                        .cell(v, s, scorer)
                        .map_or_else(|| "n/a".to_string(), fmt_ci)
                }));
                row
            })
            .collect();
        own.push(report::Table {
            title: format!("Results ({scorer}: mean [95% interval])"),
            header,
            rows,
        });
    }
    let mut tables: Vec<&report::Table> = own.iter().collect();
    tables.extend(
        results
            .extra
            .iter()
            .filter(|t| t.title.contains("pass rates")),
    );
    tables_text(&tables)
}

/// Plain-text tables with aligned columns.
fn tables_text(tables: &[&report::Table]) -> Option<String> {
    let mut out = String::new();
    for t in tables {
        let mut widths: Vec<usize> = t.header.iter().map(|h| h.chars().count()).collect();
        for r in &t.rows {
            for (i, c) in r.iter().enumerate() {
                if i < widths.len() {
                    widths[i] = widths[i].max(c.chars().count());
                }
            }
        }
        out.push_str(&t.title);
        out.push('\n');
        for r in std::iter::once(&t.header).chain(&t.rows) {
            let line: Vec<String> = r
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{c:<w$}", w = widths.get(i).copied().unwrap_or(0)))
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
        out.push('\n');
    }
    (!out.is_empty()).then_some(out)
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
    for j in plan.train_jobs() {
        let p = plan.dir.expert_run(&j.file).join("loss.jsonl");
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
                name: j.unit.clone(),
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
