//! The eval stage. Units: `eval-prompts:<skill>` (held-out prompts, from
//! the skill's generator with another seed, excluding the training prompts,
//! or from a file), `scores:<variant>:<skill>` (one image per held-out
//! prompt at fixed seeds for each variant: base, each expert, joint, each
//! merge; then every scorer's per-prompt scores) and `results` (means and
//! 95% intervals per variant x skill x scorer, `results.json`). Held-out
//! prompts and scores run in an unsharded invocation with the eval stage;
//! results are bookkeeping once every score is done.

use super::render::{read_rgb, render_png, samplers};
use super::{bar, load_model, run_parallel};
use crate::eval::scorer::{ClipScorer, ImageFilterScorer, Scorer};
use crate::eval::stats::mean_ci95;
use crate::eval::{Cell, Results};
use crate::pipeline::driver::{Claim, Counts, Driver, Gate};
use crate::pipeline::plan::{Plan, Replica};
use crate::pipeline::store::{derive_seed, file_safe, hash_file, hash_json};
use crate::pipeline::tables;
use crate::pipeline::unit::{Tag, Unit, VariantId};
use crate::prompts::PromptRecord;
use anyhow::{ensure, Context, Result};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A model variant under evaluation: its id and LoRA file.
#[derive(Debug, Clone)]
pub struct Variant {
    /// Its id; its `Display` is the variant's name (`base`, `expert:<skill>`,
    /// `joint`, `merged:<name>`; `/unfiltered` and `@seed<N>` appended in
    /// ablations and multi-seed runs).
    pub id: VariantId,
    /// Display name (`id.to_string()`).
    pub name: String,
    /// The seed-aggregated name (`name` without `@seed<N>`).
    pub group: String,
    /// The LoRA file applied (None: the base model).
    pub lora: Option<PathBuf>,
    /// The replica (seed and data setting) it belongs to.
    pub replica: Replica,
}

impl Variant {
    fn new(id: VariantId, lora: Option<PathBuf>, replica: Replica) -> Self {
        Self {
            name: id.to_string(),
            group: id.group(),
            id,
            lora,
            replica,
        }
    }
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
        v.push(Variant::new(VariantId::Base(Tag::of(&base)), None, base));
        for r in replicas.iter().filter(|r| r.seed == seed) {
            let tag = Tag::of(r);
            for name in plan.train_units() {
                let id = if name == "joint" {
                    VariantId::Joint(tag)
                } else {
                    VariantId::Expert(name.clone(), tag)
                };
                let lora = plan.dir.expert(&format!("{name}{}", r.file_suffix()));
                v.push(Variant::new(id, Some(lora), *r));
            }
            for m in &plan.merges {
                let lora = plan.dir.merged(&format!("{}{}", m.name, r.file_suffix()));
                v.push(Variant::new(
                    VariantId::Merged(m.name.clone(), tag),
                    Some(lora),
                    *r,
                ));
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
pub fn noise_base(plan: &Plan, r: &Replica) -> u64 {
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

/// `eval/scores/<variant>/<skill>.json`.
fn score_path(plan: &Plan, variant: &str, skill: &str) -> PathBuf {
    plan.dir
        .eval()
        .join("scores")
        .join(file_safe(variant))
        .join(format!("{skill}.json"))
}

/// `eval/images/<variant>/<skill>/`.
pub fn eval_image_dir(plan: &Plan, variant: &str, skill: &str) -> PathBuf {
    plan.dir
        .eval()
        .join("images")
        .join(file_safe(variant))
        .join(skill)
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
fn eval_prompts(d: &mut Driver) -> Result<()> {
    let plan = d.plan;
    let cfg = &plan.loaded.cfg;
    for s in &plan.skills {
        let unit = Unit::EvalPrompts(s.id.clone());
        let seed = derive_seed(eval_seed(plan), &["eval-prompts", &s.id]);
        let input = match &s.eval_file {
            Some(f) => json!({"file": hash_file(f)?}),
            None => {
                let Some(up) = d.upstream(&unit, &[Unit::Prompts(s.id.clone())]) else {
                    continue;
                };
                let (skill, generator, filters) = super::prompts::sources(plan, s);
                json!({
                    "skill": skill, "generator": generator, "filters": filters,
                    "count": cfg.eval.prompts, "seed": seed, "exclude": up[0],
                    "max_rounds": cfg.prompts.max_rounds,
                })
            }
        };
        let path = eval_prompts_path(plan, &s.id);
        let Claim::Todo(p) = d.claim(unit, &input, std::slice::from_ref(&path), Gate::Unsharded)?
        else {
            continue;
        };
        // Generated held-out prompts keep their loop's state here until written.
        let checkpoint = crate::prompts::Checkpoint {
            path: path.with_extension("partial.json"),
            key: p.input.clone(),
        };
        let texts = match &s.eval_file {
            Some(f) => read_prompt_file(f)?,
            None => {
                let train: Vec<PromptRecord> = selma_io::read_jsonl(&plan.dir.prompts(&s.id))?;
                let exclude: Vec<String> = train.into_iter().map(|r| r.text).collect();
                let mut job = super::prompts::job(plan, s, seed, cfg.eval.prompts);
                job.checkpoint = Some(checkpoint.clone());
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
        selma_io::write_jsonl(&path, &rows)?;
        checkpoint.remove()?;
        let counts = Counts::from([("prompts".into(), texts.len() as f64)]);
        d.finish(p, &hash_file(&path)?, counts)?;
    }
    Ok(())
}

/// The held-out prompts of a skill, with their fixed seeds: one entry per
/// evaluation image (`per_prompt` consecutive entries per prompt when > 1).
pub fn prompts_with_seeds(plan: &Plan, skill: &str, noise: u64) -> Result<Vec<(String, u64)>> {
    let rows: Vec<serde_json::Value> = selma_io::read_jsonl(&eval_prompts_path(plan, skill))?;
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

/// Images and scores of every variant x skill, then results.json.
pub fn run(d: &mut Driver) -> Result<()> {
    eval_prompts(d)?;
    let plan = d.plan;
    let cfg = &plan.loaded.cfg;
    let steps = cfg.eval.steps.unwrap_or(cfg.images.steps);
    let guidance = cfg.eval.guidance.unwrap_or(cfg.images.guidance);
    let eval_units: Vec<Unit> = plan
        .skills
        .iter()
        .map(|s| Unit::EvalPrompts(s.id.clone()))
        .collect();
    let student = if eval_units.iter().any(|u| d.output(u).is_some()) {
        d.model_id(&plan.student)?
    } else {
        String::new()
    };
    let scorer_ids: Vec<serde_json::Value> = plan
        .scorers
        .iter()
        .map(|f| json!([plan.plugin_id(f), plan.params_json(f)]))
        .collect();
    let clip_id = match &plan.clip_model {
        Some(dir) => json!(selma_io::model_identity(dir, None)?),
        None => json!(null),
    };
    let mut scorers: Option<Vec<Box<dyn Scorer>>> = None;
    let mut score_hashes = vec![];
    let mut complete = true;
    for v in variants(plan) {
        let mut model = None;
        for s in &plan.skills {
            let unit = Unit::Scores(v.id.clone(), s.id.clone());
            let mut needs = vec![Unit::EvalPrompts(s.id.clone())];
            needs.extend(v.id.unit());
            let Some(up) = d.upstream(&unit, &needs) else {
                complete = false;
                continue;
            };
            let lora_hash = match up.get(1) {
                Some(h) => json!(h),
                None => json!(null),
            };
            let images_input = hash_json(&json!({
                "student": student, "lora": lora_hash, "prompts": up[0], "steps": steps,
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
            let input = json!({
                "images": images_input, "scorers": scorer_ids, "clip": clip_id,
                "metrics": ["score", "accuracy"],
            });
            let path = score_path(plan, &v.name, &s.id);
            let claim = d.claim(unit, &input, std::slice::from_ref(&path), Gate::Unsharded)?;
            let p = match claim {
                Claim::Done => {
                    score_hashes.push(
                        d.output(&Unit::Scores(v.id.clone(), s.id.clone()))
                            .unwrap_or_default()
                            .to_string(),
                    );
                    continue;
                }
                Claim::Skip => {
                    complete = false;
                    continue;
                }
                Claim::Todo(p) => p,
            };
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
                selma_io::write_atomic(&marker, images_input.as_bytes())?;
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
                    let (prompt, seed) = &prompts[i];
                    render_png(
                        sd,
                        plan,
                        prompt,
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
            for (i, (prompt, _)) in prompts.iter().enumerate() {
                let img = read_rgb(&dir.join(format!("{i:05}.png")))?;
                for scorer in sc.iter_mut() {
                    for (column, x) in scorer.metrics(&img, prompt)? {
                        table.entry(column).or_default().push(x);
                    }
                }
            }
            selma_io::write_json(&path, &table)?;
            let out = hash_file(&path)?;
            score_hashes.push(out.clone());
            let counts = Counts::from([("images".into(), prompts.len() as f64)]);
            d.finish(p, &out, counts)?;
        }
    }
    if !complete {
        return Ok(());
    }
    results(d, score_hashes)
}

/// `results.json` from every variant's scores.
fn results(d: &mut Driver, score_hashes: Vec<String>) -> Result<()> {
    let plan = d.plan;
    let extra = tables::pass_rates(plan);
    let mut input = json!({"scores": score_hashes, "extra": serde_json::to_value(&extra)?});
    if ablation_mode(plan) {
        input["ablation"] = json!(groups(plan));
    }
    let Claim::Todo(p) = d.claim(Unit::Results, &input, &[plan.dir.results()], Gate::Always)?
    else {
        return Ok(());
    };
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
            let path = score_path(plan, &v.name, &s.id);
            let table: BTreeMap<String, Vec<f64>> = selma_io::read_json(&path)?;
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
        tables::ablation_results(plan, &vs, scorer_names, cells, &raw, extra)
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
    let counts = Counts::from([("cells".into(), results.cells.len() as f64)]);
    d.finish(p, &hash_file(&plan.dir.results())?, counts)
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
    if let Some(dir) = &plan.clip_model {
        let device = selma_diffusion::pipeline::parse_device(&plan.loaded.cfg.run.device)?;
        out.push(Box::new(
            ClipScorer::load(dir, &device)
                .with_context(|| format!("loading CLIP {}", dir.display()))?,
        ));
    }
    Ok(out)
}
