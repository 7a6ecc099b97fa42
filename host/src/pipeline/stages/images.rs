//! The images stage. Units: `images:<skill>` (the teacher's images of the
//! skill's prompts, `per_prompt` each at derived seeds) and `filter:<skill>`
//! (the image filters' verdicts on them). Images inputs: the prompts' hash,
//! the teacher's identity, the image settings and the run seed; shards
//! split the images by prompt and any invocation finishes a skill whose
//! images are all rendered. Filter inputs: the images' hash and the image
//! filters with their parameters; it is bookkeeping on finished images, so
//! it runs whatever stages are selected. Outputs: `<skill>/images/*.png`,
//! then `verdicts.jsonl` and `metadata.jsonl` (the kept images).

use super::render::{read_rgb, render_png, samplers};
use super::{bar, load_model, run_parallel};
use crate::pipeline::config::Stage;
use crate::pipeline::driver::{Claim, Counts, Driver, Gate, Pending};
use crate::pipeline::plan::Plan;
use crate::pipeline::store::{derive_seed, hash_file, hash_json};
use crate::pipeline::unit::Unit;
use crate::prompts::PromptRecord;
use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One image's name in a skill's folder.
pub fn image_name(prompt: usize, image: usize) -> String {
    format!("{prompt:05}-{image}.png")
}

/// The noise seed of image `j` of prompt `i` of a skill.
pub fn image_seed(plan: &Plan, skill: &str, i: usize, j: usize) -> u64 {
    derive_seed(
        plan.seed(),
        &["image", skill, &i.to_string(), &j.to_string()],
    )
}

/// One line of `<skill>/images/verdicts.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageVerdictRecord {
    /// The image's file name in the skill's images folder.
    pub file_name: String,
    /// Its prompt.
    pub text: String,
    /// Its noise seed.
    pub seed: u64,
    /// Kept by every image filter?
    pub keep: bool,
    /// Score of each image filter, by plugin name.
    pub scores: BTreeMap<String, f64>,
    /// Why the first filter that dropped it did so.
    pub reason: Option<String>,
}

/// Settings that define generated images (for input hashes).
fn image_settings(plan: &Plan) -> serde_json::Value {
    let im = &plan.loaded.cfg.images;
    json!({
        "per_prompt": im.per_prompt, "steps": im.steps, "guidance": im.guidance,
        "scheduler": im.scheduler.get_ref(), "eta": im.eta, "width": im.width,
        "height": im.height, "negative": im.negative, "dtype": plan.loaded.cfg.run.dtype,
    })
}

/// Remove a folder's PNGs and listing files (stale images of other inputs).
fn clear_images(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_file() {
            std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    Ok(())
}

/// A skill's images unit being worked on in this invocation.
struct Todo {
    skill: String,
    pending: Pending,
    /// (file, prompt, seed) of every image of the skill.
    files: Vec<(String, String, u64)>,
    /// The images this invocation renders.
    mine: Vec<usize>,
}

/// Render every skill's images (this shard's share), then run the image
/// filters on each skill whose images are complete.
pub fn run(d: &mut Driver) -> Result<()> {
    let plan = d.plan;
    let im = &plan.loaded.cfg.images;
    let shard = plan.opts.shard;
    // Pass 1: units and pending work. The shard split is by prompt: skill
    // k's prompt i is item (sum of the configured counts of the skills
    // before k) + i, the same whatever is already done.
    let mut todos = vec![];
    let mut offset = 0usize;
    for s in &plan.skills {
        let base = offset;
        offset += s.count;
        let unit = Unit::Images(s.id.clone());
        let Some(up) = d.upstream(&unit, &[Unit::Prompts(s.id.clone())]) else {
            continue;
        };
        let teacher = d.model_id(&plan.teacher)?;
        let input = json!({
            "prompts": up[0], "teacher": teacher, "settings": image_settings(plan),
            "seed": plan.seed(),
        });
        let records: Vec<PromptRecord> = selma_io::read_jsonl(&plan.dir.prompts(&s.id))?;
        let mut files = vec![];
        let mut mine = vec![];
        for (i, r) in records.iter().enumerate() {
            let owned = shard.is_none_or(|sh| sh.owns(base + i));
            for j in 0..im.per_prompt {
                if owned {
                    mine.push(files.len());
                }
                files.push((
                    image_name(i, j),
                    r.text.clone(),
                    image_seed(plan, &s.id, i, j),
                ));
            }
        }
        let dir = plan.dir.images(&s.id);
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(&f.0)).collect();
        let Claim::Todo(pending) = d.claim(unit, &input, &paths, Gate::Resumable)? else {
            continue;
        };
        // Without the images stage selected, images rendered earlier (by
        // other shards) for these very inputs are only finalised.
        if !d.wants(Stage::Images) {
            mine.clear();
        }
        todos.push(Todo {
            skill: s.id.clone(),
            pending,
            files,
            mine,
        });
    }
    // Pass 2: render.
    let mut pending = 0u64;
    for t in &todos {
        let dir = plan.dir.images(&t.skill);
        let started = plan
            .dir
            .manifest(Stage::Images.name(), &t.pending.unit.to_string())
            .is_some_and(|m| m.input_hash == t.pending.input);
        if !started {
            clear_images(&dir)?;
            t.pending.mark_started(&plan.dir)?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        pending += t
            .mine
            .iter()
            .filter(|&&k| !dir.join(&t.files[k].0).is_file())
            .count() as u64;
    }
    if pending > 0 {
        let sd = load_model(plan, &plan.teacher)?;
        let workers = samplers(plan, &sd);
        let b = bar(plan.opts.progress, pending, "images");
        for t in &todos {
            let dir = plan.dir.images(&t.skill);
            b.set_message(format!("images {}", t.skill));
            let jobs: Vec<usize> = t
                .mine
                .iter()
                .copied()
                .filter(|&k| !dir.join(&t.files[k].0).is_file())
                .collect();
            run_parallel(workers, &jobs, |&k| {
                let (file, prompt, seed) = &t.files[k];
                render_png(
                    &sd,
                    plan,
                    prompt,
                    *seed,
                    im.steps,
                    im.guidance,
                    &dir.join(file),
                    "teacher",
                )?;
                b.inc(1);
                Ok(())
            })?;
        }
        b.finish_and_clear();
    }
    // Pass 3: complete skills are done.
    for t in todos {
        let dir = plan.dir.images(&t.skill);
        let missing = t.files.iter().filter(|f| !dir.join(&f.0).is_file()).count();
        if missing > 0 {
            d.wait(
                &t.pending.unit,
                format!(
                    "{missing} of {} images are not rendered yet (other shards?)",
                    t.files.len()
                ),
            );
            continue;
        }
        let mut hashes = vec![];
        for (f, p, s) in &t.files {
            hashes.push(json!([f, p, s, hash_file(&dir.join(f))?]));
        }
        let out = hash_json(&json!(hashes));
        let counts = Counts::from([("images".into(), t.files.len() as f64)]);
        d.finish(t.pending, &out, counts)?;
    }
    filters(d)
}

/// Run the image filters on every skill whose images are done.
fn filters(d: &mut Driver) -> Result<()> {
    let plan = d.plan;
    let im = &plan.loaded.cfg.images;
    let mut runtime = None;
    for s in &plan.skills {
        let unit = Unit::Filter(s.id.clone());
        let Some(up) = d.upstream(&unit, &[Unit::Images(s.id.clone())]) else {
            continue;
        };
        let images_hash = up[0].clone();
        let input = json!({
            "images": images_hash,
            "filters": plan.image_filters.iter().map(|f| json!([plan.plugin_id(f), plan.params_json(f)])).collect::<Vec<_>>(),
            "seed": plan.seed(),
        });
        let dir = plan.dir.images(&s.id);
        let meta = dir.join("metadata.jsonl");
        let Claim::Todo(p) = d.claim(unit, &input, std::slice::from_ref(&meta), Gate::Always)?
        else {
            continue;
        };
        if runtime.is_none() {
            let rt = plan.runtime(derive_seed(plan.seed(), &["image-filters"]))?;
            let mut loaded = vec![];
            for f in &plan.image_filters {
                let p = rt
                    .image_filter(f)
                    .with_context(|| format!("loading image filter {f:?}"))?;
                let params = p.params_toml(&plan.params_of(f))?;
                loaded.push((p, params));
            }
            runtime = Some((rt, loaded));
        }
        let (_, loaded) = runtime.as_mut().expect("set above");
        let records: Vec<PromptRecord> = selma_io::read_jsonl(&plan.dir.prompts(&s.id))?;
        let mut verdicts = vec![];
        let mut passed: Vec<usize> = vec![0; loaded.len()];
        for (i, r) in records.iter().enumerate() {
            for j in 0..im.per_prompt {
                let file = image_name(i, j);
                let img = read_rgb(&dir.join(&file))?;
                let mut v = ImageVerdictRecord {
                    file_name: file,
                    text: r.text.clone(),
                    seed: image_seed(plan, &s.id, i, j),
                    keep: true,
                    scores: BTreeMap::new(),
                    reason: None,
                };
                for (k, (f, params)) in loaded.iter_mut().enumerate() {
                    let verdict = f.check(&img, &r.text, params).with_context(|| {
                        format!("image filter {:?} on {}", f.name(), v.file_name)
                    })?;
                    v.scores.insert(f.name().to_string(), verdict.score as f64);
                    if verdict.keep {
                        passed[k] += 1;
                    } else if v.keep {
                        v.keep = false;
                        v.reason = Some(format!(
                            "{}: {}",
                            f.name(),
                            verdict.reason.unwrap_or_default()
                        ));
                    }
                }
                verdicts.push(v);
            }
        }
        let kept: Vec<serde_json::Value> = verdicts
            .iter()
            .filter(|v| v.keep)
            .map(|v| json!({"file_name": v.file_name, "text": v.text}))
            .collect();
        ensure!(
            !kept.is_empty(),
            "skill {}: the image filters kept none of its {} images (see {}); loosen their [params] or drop them",
            s.id,
            verdicts.len(),
            dir.join("verdicts.jsonl").display()
        );
        selma_io::write_jsonl(&dir.join("verdicts.jsonl"), &verdicts)?;
        selma_io::write_jsonl(&meta, &kept)?;
        let out = hash_json(&json!([images_hash, hash_file(&meta)?]));
        let n = verdicts.len() as f64;
        let mut counts = Counts::from([
            ("generated".into(), n),
            ("kept".into(), kept.len() as f64),
            ("pass_rate".into(), kept.len() as f64 / n),
        ]);
        for ((f, _), k) in loaded.iter().zip(&passed) {
            counts.insert(format!("pass_rate:{}", f.name()), *k as f64 / n);
        }
        d.finish(p, &out, counts)?;
    }
    Ok(())
}
