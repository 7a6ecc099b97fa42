//! The producing stages of a run: prompts (per skill), images (per skill,
//! one file per image, then the image filters), train (one expert per skill
//! plus the joint baseline, resumable from the trainer's checkpoints) and
//! merge (one file per `[[merge]]`). Each unit is skipped when its manifest
//! says it is done with the same inputs.

use super::config::Stage;
use super::plan::Plan;
use super::store::{
    derive_seed, hash_file, hash_json, model_identity, read_jsonl, write_json, write_jsonl,
    Manifest,
};
use crate::prompts::{PromptRecord, PromptsJob};
use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// What the stages of this invocation know and did.
#[derive(Default)]
pub struct Ctx {
    /// Output hash of every done unit, by unit name.
    pub outputs: HashMap<String, String>,
    /// Units run (not skipped) by this invocation.
    pub ran: Vec<String>,
    /// Units that could not run yet (missing upstream work), with the reason.
    pub waiting: Vec<(String, String)>,
    /// Model identities (computed once).
    pub model_ids: HashMap<PathBuf, String>,
}

impl Ctx {
    /// Identity of a model folder, creating the tiny model first when allowed.
    pub fn model_id(&mut self, plan: &Plan, dir: &Path) -> Result<String> {
        if let Some(id) = self.model_ids.get(dir) {
            return Ok(id.clone());
        }
        ensure_model(plan, dir)?;
        let id = model_identity(dir)?;
        self.model_ids.insert(dir.to_path_buf(), id.clone());
        Ok(id)
    }

    fn done(&mut self, m: &Manifest) {
        self.outputs.insert(m.unit.clone(), m.output_hash.clone());
    }
}

/// Create the configured random model (`models.init_preset`, or the tiny one
/// for `init_tiny`) at `dir` when it is missing.
pub fn ensure_model(plan: &Plan, dir: &Path) -> Result<()> {
    if dir.join("model_index.json").is_file() {
        return Ok(());
    }
    let m = &plan.loaded.cfg.models;
    let Some(name) = m.preset() else {
        bail!(
            "model folder {} is missing (set models.init_tiny = true or models.init_preset = \"shapeworld\" to create a random model)",
            dir.display()
        );
    };
    let preset: selma_diffusion::init::Preset = name.parse()?;
    eprintln!("creating the {name} random model in {}", dir.display());
    let res = selma_diffusion::init::init_model_with_vocabulary(
        preset,
        dir,
        m.init_seed,
        &selma_shapeworld::caption::VOCABULARY,
    );
    match res {
        Ok(_) => Ok(()),
        // Another shard may have created it at the same time.
        Err(_) if dir.join("model_index.json").is_file() => Ok(()),
        Err(e) => Err(e.context(format!("creating the {name} model in {}", dir.display()))),
    }
}

/// A progress bar (hidden unless `show`).
pub fn bar(show: bool, len: u64, what: &str) -> ProgressBar {
    let b = if show {
        ProgressBar::new(len)
    } else {
        ProgressBar::hidden()
    };
    b.set_style(
        ProgressStyle::with_template(&format!(
            "{{msg:<30}} [{{bar:30}}] {{pos}}/{{len}} {what} {{elapsed}} eta {{eta}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    b
}

fn manifest(stage: Stage, unit: &str, input: &str, output: &str, done: bool) -> Manifest {
    Manifest {
        stage: stage.name().into(),
        unit: unit.into(),
        input_hash: input.into(),
        output_hash: output.into(),
        done,
        counts: BTreeMap::new(),
    }
}

// ---------------------------------------------------------------- prompts

/// Generate every skill's prompts.
pub fn prompts(plan: &Plan, ctx: &mut Ctx) -> Result<()> {
    let cfg = &plan.loaded.cfg;
    for s in &plan.skills {
        let unit = format!("prompts:{}", s.id);
        let seed = derive_seed(plan.seed(), &["prompts", &s.id]);
        let input = hash_json(&json!({
            "skill": plan.plugin_id(&s.spec),
            "generator": [plan.plugin_id(&s.generator), plan.params_json(&s.generator)],
            "filters": s.filters.iter().map(|f| json!([plan.plugin_id(f), plan.params_json(f)])).collect::<Vec<_>>(),
            "skill_params": plan.params_json(&s.spec),
            "count": s.count,
            "max_rounds": cfg.prompts.max_rounds,
            "seed": seed,
            "llm": cfg.llm.as_ref().map(|l| json!([l.endpoint, l.model, l.chat])),
        }));
        if let Some(m) = plan
            .dir
            .done_with("prompts", &unit, &input, &[plan.dir.prompts(&s.id)])
        {
            ctx.done(&m);
            continue;
        }
        if !plan.wants(Stage::Prompts) {
            ctx.waiting
                .push((unit, "the prompts stage was not selected".into()));
            continue;
        }
        let job = prompts_job(plan, s, seed, s.count);
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
        let path = plan.dir.prompts(&s.id);
        crate::prompts::write_jsonl(&path, &out.records)?;
        write_json(
            &plan.dir.skill_dir(&s.id).join("prompts.stats.json"),
            &out.stats,
        )?;
        let mut m = manifest(Stage::Prompts, &unit, &input, &hash_file(&path)?, true);
        m.counts.insert("prompts".into(), out.records.len() as f64);
        m.counts.insert("wanted".into(), s.count as f64);
        m.counts.insert("rounds".into(), out.stats.rounds as f64);
        plan.dir.write_manifest(&m)?;
        ctx.done(&m);
        ctx.ran.push(unit);
    }
    Ok(())
}

/// The prompts job of a skill.
pub fn prompts_job(plan: &Plan, s: &super::plan::SkillPlan, seed: u64, count: usize) -> PromptsJob {
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
    }
}

// ---------------------------------------------------------------- images

/// One image's name in a skill's folder.
pub fn image_name(prompt: usize, image: usize) -> String {
    format!("{prompt:05}-{image}.png")
}

/// One line of `<skill>/images/verdicts.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageVerdictRecord {
    pub file_name: String,
    pub text: String,
    pub seed: u64,
    pub keep: bool,
    /// Score of each image filter, by plugin name.
    pub scores: BTreeMap<String, f64>,
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

/// Load a diffusers folder with the run's device and dtype.
pub fn load_model(plan: &Plan, dir: &Path) -> Result<selma_diffusion::pipeline::StableDiffusion> {
    let device = selma_diffusion::pipeline::parse_device(&plan.loaded.cfg.run.device)?;
    let dtype = selma_diffusion::pipeline::parse_dtype(&plan.loaded.cfg.run.dtype)?;
    selma_diffusion::pipeline::StableDiffusion::load(dir, &device, dtype)
        .with_context(|| format!("loading the model {}", dir.display()))
}

/// The run's image size: `[images]` width/height, else the model's native size.
fn image_size(plan: &Plan, sd: &selma_diffusion::pipeline::StableDiffusion) -> (usize, usize) {
    let im = &plan.loaded.cfg.images;
    let native = sd.unet.config().sample_size.unwrap_or(64) * sd.vae_scale();
    (im.width.unwrap_or(native), im.height.unwrap_or(native))
}

/// Render one image and write it (atomically) as a PNG with its parameters.
#[allow(clippy::too_many_arguments)]
pub fn render_png(
    sd: &selma_diffusion::pipeline::StableDiffusion,
    plan: &Plan,
    prompt: &str,
    seed: u64,
    steps: usize,
    guidance: f64,
    out: &Path,
    note: &str,
) -> Result<()> {
    use selma_diffusion::pipeline::{GenerateRequest, InitNoise};
    use selma_diffusion::scheduler::{SamplerOptions, SchedulerKind};
    let im = &plan.loaded.cfg.images;
    let (w, h) = image_size(plan, sd);
    let scheduler: SchedulerKind = im.scheduler.get_ref().parse()?;
    let req = GenerateRequest {
        prompt: prompt.to_string(),
        negative: im.negative.clone(),
        steps,
        guidance,
        scheduler,
        sampler: SamplerOptions {
            eta: im.eta,
            karras: None,
        },
        width: w,
        height: h,
        batch: 1,
        init: InitNoise::Seed(seed),
        noise_seed: seed,
    };
    let img = sd
        .generate(&req, &mut |_, _| {})
        .with_context(|| format!("rendering {prompt:?}"))?
        .remove(0);
    let params = format!(
        "{prompt}\nSteps: {steps}, Sampler: {scheduler}, CFG scale: {guidance}, Seed: {seed}, Size: {}x{}, {note}",
        img.width, img.height
    );
    selma_diffusion::image_io::write_png(out, img.width, img.height, &img.pixels, &params)
}

/// How many images to render at once. On the CPU a small model's GEMMs
/// (latents of at most 32x32) keep one core busy and leave the others idle,
/// so one sampler runs per core (measured on ShapeWorld: 2 threads inside one
/// sampler were no faster than 1); a large model's GEMMs already use every
/// core, and a GPU runs one sampler.
pub fn samplers(plan: &Plan, sd: &selma_diffusion::pipeline::StableDiffusion) -> usize {
    let (f, (w, h)) = (sd.vae_scale(), image_size(plan, sd));
    if !sd.device().is_cpu() || (w / f) * (h / f) > 32 * 32 {
        return 1;
    }
    cpu_cores()
}

/// The cores selma uses: RAYON_NUM_THREADS when set, else every core.
fn cpu_cores() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Run `f` on every job with `workers` threads (each job's output is its own
/// file, so the order does not matter). Stops handing out jobs after the
/// first error and returns the error of the earliest failed job.
pub fn run_parallel<J: Sync>(
    workers: usize,
    jobs: &[J],
    f: impl Fn(&J) -> Result<()> + Sync,
) -> Result<()> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    if workers <= 1 || jobs.len() <= 1 {
        return jobs.iter().try_for_each(f);
    }
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let errors = std::sync::Mutex::new(vec![]);
    std::thread::scope(|scope| {
        for _ in 0..workers.min(jobs.len()) {
            scope.spawn(|| {
                while !failed.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    if let Err(e) = f(job) {
                        failed.store(true, Ordering::Relaxed);
                        errors.lock().expect("no panics hold it").push((i, e));
                    }
                }
            });
        }
    });
    let errors = errors.into_inner().expect("workers are done");
    match errors.into_iter().min_by_key(|(i, _)| *i) {
        Some((_, e)) => Err(e),
        None => Ok(()),
    }
}

/// Read a PNG as the runtime's image type.
pub fn read_rgb(path: &Path) -> Result<selma_runtime::RgbImage> {
    let png = selma_diffusion::image_io::read_png(path)?;
    Ok(selma_runtime::RgbImage {
        width: png.width as u32,
        height: png.height as u32,
        pixels: png.rgb,
        non_finite: 0.0,
    })
}

/// Render every skill's images (this shard's share), then run the image
/// filters on each skill whose images are complete.
pub fn images(plan: &Plan, ctx: &mut Ctx) -> Result<()> {
    let im = &plan.loaded.cfg.images;
    let shard = plan.opts.shard;
    // Pass 1: units and pending work.
    struct Todo {
        skill: String,
        unit: String,
        input: String,
        files: Vec<(String, String, u64)>, // (file, prompt, seed)
        mine: Vec<usize>,
    }
    let mut todos = vec![];
    // Shard split by prompt: skill k's prompt i is unit (sum of the configured
    // counts of skills before k) + i, the same whatever is already done.
    let mut offset = 0usize;
    for s in &plan.skills {
        let base = offset;
        offset += s.count;
        let unit = format!("images:{}", s.id);
        let Some(prompts_hash) = ctx.outputs.get(&format!("prompts:{}", s.id)).cloned() else {
            ctx.waiting
                .push((unit, format!("prompts of {} are not done", s.id)));
            continue;
        };
        let teacher = ctx.model_id(plan, &plan.teacher)?;
        let input = hash_json(&json!({
            "prompts": prompts_hash, "teacher": teacher, "settings": image_settings(plan),
            "seed": plan.seed(),
        }));
        let records: Vec<PromptRecord> = read_jsonl(&plan.dir.prompts(&s.id))?;
        let mut files = vec![];
        let mut mine = vec![];
        for (i, r) in records.iter().enumerate() {
            let owned = shard.is_none_or(|sh| sh.owns(base + i));
            for j in 0..im.per_prompt {
                let seed = derive_seed(
                    plan.seed(),
                    &["image", &s.id, &i.to_string(), &j.to_string()],
                );
                if owned {
                    mine.push(files.len());
                }
                files.push((image_name(i, j), r.text.clone(), seed));
            }
        }
        let dir = plan.dir.images(&s.id);
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(&f.0)).collect();
        if let Some(m) = plan.dir.done_with("images", &unit, &input, &paths) {
            ctx.done(&m);
            continue;
        }
        // Without the images stage selected, images rendered earlier (by
        // other shards) for these very inputs are still finalised below.
        let partial_same = plan
            .dir
            .manifest("images", &unit)
            .is_some_and(|m| m.input_hash == input);
        if !plan.wants(Stage::Images) && !partial_same {
            ctx.waiting
                .push((unit, "the images stage was not selected".into()));
            continue;
        }
        if !plan.wants(Stage::Images) {
            mine.clear();
        }
        todos.push(Todo {
            skill: s.id.clone(),
            unit,
            input,
            files,
            mine,
        });
    }
    // Pass 2: render.
    let mut pending = 0u64;
    for t in &todos {
        let dir = plan.dir.images(&t.skill);
        match plan.dir.manifest("images", &t.unit) {
            Some(m) if m.input_hash == t.input => {}
            _ => {
                clear_images(&dir)?;
                plan.dir
                    .write_manifest(&manifest(Stage::Images, &t.unit, &t.input, "", false))?;
            }
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
    // Pass 3: complete skills get their manifest.
    for t in &todos {
        let dir = plan.dir.images(&t.skill);
        let missing = t.files.iter().filter(|f| !dir.join(&f.0).is_file()).count();
        if missing > 0 {
            ctx.waiting.push((
                t.unit.clone(),
                format!(
                    "{missing} of {} images are not rendered yet (other shards?)",
                    t.files.len()
                ),
            ));
            continue;
        }
        let mut hashes = vec![];
        for (f, p, s) in &t.files {
            hashes.push(json!([f, p, s, hash_file(&dir.join(f))?]));
        }
        let out = hash_json(&json!(hashes));
        let mut m = manifest(Stage::Images, &t.unit, &t.input, &out, true);
        m.counts.insert("images".into(), t.files.len() as f64);
        plan.dir.write_manifest(&m)?;
        ctx.done(&m);
        ctx.ran.push(t.unit.clone());
    }
    filters(plan, ctx)
}

/// Run the image filters on every skill whose images are done (also when
/// the images stage is not selected: it is bookkeeping on finished images).
fn filters(plan: &Plan, ctx: &mut Ctx) -> Result<()> {
    let im = &plan.loaded.cfg.images;
    let mut runtime = None;
    for s in &plan.skills {
        let unit = format!("filter:{}", s.id);
        let Some(images_hash) = ctx.outputs.get(&format!("images:{}", s.id)).cloned() else {
            ctx.waiting
                .push((unit, format!("images of {} are not done", s.id)));
            continue;
        };
        let input = hash_json(&json!({
            "images": images_hash,
            "filters": plan.image_filters.iter().map(|f| json!([plan.plugin_id(f), plan.params_json(f)])).collect::<Vec<_>>(),
            "seed": plan.seed(),
        }));
        if let Some(m) = plan.dir.done_with(
            "images",
            &unit,
            &input,
            &[plan.dir.images(&s.id).join("metadata.jsonl")],
        ) {
            ctx.done(&m);
            continue;
        }
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
        let dir = plan.dir.images(&s.id);
        let records: Vec<PromptRecord> = read_jsonl(&plan.dir.prompts(&s.id))?;
        let mut verdicts = vec![];
        let mut passed: Vec<usize> = vec![0; loaded.len()];
        for (i, r) in records.iter().enumerate() {
            for j in 0..im.per_prompt {
                let file = image_name(i, j);
                let seed = derive_seed(
                    plan.seed(),
                    &["image", &s.id, &i.to_string(), &j.to_string()],
                );
                let img = read_rgb(&dir.join(&file))?;
                let mut v = ImageVerdictRecord {
                    file_name: file,
                    text: r.text.clone(),
                    seed,
                    keep: true,
                    scores: BTreeMap::new(),
                    reason: None,
                };
                for (k, (p, params)) in loaded.iter_mut().enumerate() {
                    let verdict = p.check(&img, &r.text, params).with_context(|| {
                        format!("image filter {:?} on {}", p.name(), v.file_name)
                    })?;
                    v.scores.insert(p.name().to_string(), verdict.score as f64);
                    if verdict.keep {
                        passed[k] += 1;
                    } else if v.keep {
                        v.keep = false;
                        v.reason = Some(format!(
                            "{}: {}",
                            p.name(),
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
        write_jsonl(&dir.join("verdicts.jsonl"), &verdicts)?;
        let meta = dir.join("metadata.jsonl");
        write_jsonl(&meta, &kept)?;
        let out = hash_json(&json!([images_hash, hash_file(&meta)?]));
        let mut m = manifest(Stage::Images, &unit, &input, &out, true);
        m.counts.insert("generated".into(), verdicts.len() as f64);
        m.counts.insert("kept".into(), kept.len() as f64);
        m.counts.insert(
            "pass_rate".into(),
            kept.len() as f64 / verdicts.len() as f64,
        );
        for ((p, _), n) in loaded.iter().zip(&passed) {
            m.counts.insert(
                format!("pass_rate:{}", p.name()),
                *n as f64 / verdicts.len() as f64,
            );
        }
        plan.dir.write_manifest(&m)?;
        ctx.done(&m);
        ctx.ran.push(unit);
    }
    Ok(())
}

// ---------------------------------------------------------------- train

/// The rows of a training set over several skills' images (paths relative
/// to `experts/<file>.data/`): each skill's kept images, or every rendered
/// image when `unfiltered`.
fn data_rows(plan: &Plan, skills: &[&str], unfiltered: bool) -> Result<Vec<serde_json::Value>> {
    let mut rows = vec![];
    for s in skills {
        for mut r in skill_rows(plan, s, unfiltered)? {
            let f = r["file_name"].as_str().unwrap_or_default().to_string();
            r["file_name"] = json!(format!("../../{s}/images/{f}"));
            rows.push(r);
        }
    }
    Ok(rows)
}

/// Writes a training listing `experts/<file>.data/metadata.jsonl`.
fn write_data(plan: &Plan, file: &str, rows: &[serde_json::Value]) -> Result<PathBuf> {
    let data = plan.dir.experts().join(format!("{file}.data"));
    write_jsonl(&data.join("metadata.jsonl"), rows)?;
    Ok(data)
}

/// Where `[train.replay]`'s pool lives: its folder, how listings under
/// `experts/<file>.data/` reach it (relative inside the run directory, so a
/// moved run keeps working), and its identity for input hashes. A ShapeWorld
/// pool is identified by its render settings (it is deterministic) and
/// rendered only when an adapter trains ([`replay_rows_of`]); a folder pool
/// by its listing and its files' names, sizes and modification times.
fn replay_pool(
    plan: &Plan,
    r: &super::config::ReplaySection,
) -> Result<(PathBuf, PathBuf, String)> {
    match (&r.data, r.shapeworld) {
        (Some(d), _) => {
            let dir = plan.loaded.resolve(d, &plan.dir.root);
            let reach = match dir.strip_prefix(&plan.dir.root) {
                Ok(inside) => Path::new("../..").join(inside),
                Err(_) => std::path::absolute(&dir).unwrap_or_else(|_| dir.clone()),
            };
            let meta = dir.join("metadata.jsonl");
            let mut files = vec![];
            for e in
                std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?
            {
                let e = e?;
                let m = e.metadata()?;
                let mtime = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                files.push(json!([
                    e.file_name().to_string_lossy(),
                    m.len(),
                    mtime.to_string()
                ]));
            }
            files.sort_by_key(|f| f[0].as_str().unwrap_or_default().to_string());
            let id = hash_json(&json!({"listing": hash_file(&meta)?, "files": files}));
            Ok((dir, reach, id))
        }
        (None, Some(n)) => {
            let id = hash_json(&json!({
                "shapeworld": n, "mix": r.mix, "number_word_keep": r.number_word_keep, "seed": r.seed,
            }));
            let name = format!("shapeworld-{}", &id[..12]);
            let dir = plan.dir.root.join("replay").join(&name);
            Ok((dir, Path::new("../../replay").join(name), id))
        }
        (None, None) => bail!("[train.replay] names no pool"),
    }
}

/// The pool's rows as listing rows (rendering a ShapeWorld pool first if it
/// is not there; shards racing to render it accept the one that wins).
fn replay_rows_of(
    r: &super::config::ReplaySection,
    dir: &Path,
    reach: &Path,
) -> Result<Vec<serde_json::Value>> {
    let meta = dir.join("metadata.jsonl");
    if let (Some(n), false) = (r.shapeworld, meta.is_file()) {
        let opts = selma_shapeworld::DatasetOptions {
            count: n,
            seed: r.seed,
            sample: selma_shapeworld::SampleOptions {
                mix: selma_shapeworld::Mix::parse(&r.mix)?,
                number_word_keep: r.number_word_keep,
            },
            overwrite: false,
            threads: 0,
        };
        if let Err(e) = selma_shapeworld::write_dataset(dir, &opts) {
            if !meta.is_file() {
                return Err(e)
                    .with_context(|| format!("rendering the replay pool {}", dir.display()));
            }
        }
    }
    let mut rows = vec![];
    for (i, r) in read_jsonl::<serde_json::Value>(&meta)?
        .into_iter()
        .enumerate()
    {
        let (Some(f), Some(text)) = (r["file_name"].as_str(), r["text"].as_str()) else {
            bail!(
                "{} line {}: needs file_name and text",
                meta.display(),
                i + 1
            );
        };
        let path = reach.join(f);
        rows.push(json!({"file_name": path.to_string_lossy(), "text": text}));
    }
    ensure!(
        !rows.is_empty(),
        "the replay pool {} is empty",
        meta.display()
    );
    Ok(rows)
}

/// Whether `[train.extra]` turns on an EMA of the LoRA weights.
fn extra_has_ema(extra: &toml::Table) -> bool {
    extra
        .get("ema_decay")
        .and_then(|v| v.as_float().or(v.as_integer().map(|i| i as f64)))
        .is_some_and(|d| d > 0.0)
}

/// `k` skill rows get round(k * share / (1 - share)) replay rows: a seeded
/// shuffle of the pool, cycled when the pool is smaller.
fn replay_rows(
    pool: &[serde_json::Value],
    k: usize,
    share: f64,
    seed: u64,
) -> Vec<serde_json::Value> {
    let n = (k as f64 * share / (1.0 - share)).round() as usize;
    let mut order: Vec<usize> = (0..pool.len()).collect();
    let mut rng = selma_shapeworld::SplitMix64::new(seed);
    for i in (1..order.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    (0..n)
        .map(|i| pool[order[i % pool.len()]].clone())
        .collect()
}

/// A skill's training rows (`file_name`, `text`): the kept images, or every
/// rendered image when `unfiltered`.
fn skill_rows(plan: &Plan, skill: &str, unfiltered: bool) -> Result<Vec<serde_json::Value>> {
    if !unfiltered {
        return read_jsonl(&plan.dir.images(skill).join("metadata.jsonl"));
    }
    let records: Vec<PromptRecord> = read_jsonl(&plan.dir.prompts(skill))?;
    let mut rows = vec![];
    for (i, r) in records.iter().enumerate() {
        for j in 0..plan.loaded.cfg.images.per_prompt {
            rows.push(json!({"file_name": image_name(i, j), "text": r.text}));
        }
    }
    Ok(rows)
}

/// Does the folder hold a finished checkpoint?
fn has_checkpoint(run: &Path) -> bool {
    std::fs::read_dir(run)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().starts_with("checkpoint-") && e.path().is_dir())
}

/// One adapter to train in this invocation.
struct TrainWork {
    unit: String,
    input: String,
    file: String,
    run: PathBuf,
    steps: u64,
    resume: bool,
    config: selma_train::trainer::TrainConfig,
}

/// How many adapters train at once: one per core for a small UNet (weights
/// under 64 MiB) on the CPU, whose GEMMs leave the second core idle (on
/// ShapeWorld two trainers side by side ran 3.4 updates/s each where one
/// alone ran 2.9), else one (a large model's GEMMs use every core; a GPU
/// runs one job at a time).
fn trainers(plan: &Plan, jobs: usize) -> usize {
    if !plan.loaded.cfg.run.device.starts_with("cpu") {
        return 1;
    }
    let unet_bytes: u64 = std::fs::read_dir(plan.student.join("unet"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    if unet_bytes == 0 || unet_bytes > 64 << 20 {
        return 1;
    }
    cpu_cores().min(jobs).max(1)
}

/// Train every expert (this shard's share) and the joint baseline.
pub fn train(plan: &Plan, ctx: &mut Ctx) -> Result<()> {
    let cfg = &plan.loaded.cfg;
    let replay = match &cfg.train.replay {
        Some(r) => Some(replay_pool(plan, r)?),
        None => None,
    };
    // The pool's rows, read (and a ShapeWorld pool rendered) once, when the
    // first adapter that needs them trains.
    let mut pool: Option<Vec<serde_json::Value>> = None;
    let mut work = vec![];
    for (k, job) in plan.train_jobs().iter().enumerate() {
        let (name, unit, file) = (&job.name, job.unit.clone(), job.file.as_str());
        // Filtered data comes from the filter unit; unfiltered from the images.
        let data_stage = if job.replica.unfiltered {
            "images"
        } else {
            "filter"
        };
        let skills: Vec<&str> = if name == "joint" {
            plan.skills.iter().map(|s| s.id.as_str()).collect()
        } else {
            vec![name.as_str()]
        };
        let mut data_hashes = vec![];
        let mut missing = None;
        for s in &skills {
            match ctx.outputs.get(&format!("{data_stage}:{s}")) {
                Some(h) => data_hashes.push(h.clone()),
                None => missing = Some(*s),
            }
        }
        if let Some(s) = missing {
            ctx.waiting
                .push((unit, format!("images of {s} are not done")));
            continue;
        }
        let student = ctx.model_id(plan, &plan.student)?;
        let steps = if name == "joint" {
            cfg.train.joint_steps.unwrap_or(cfg.train.steps)
        } else {
            cfg.train.steps
        };
        let seed = derive_seed(plan.replica_seed(&job.replica), &["train", name]);
        let mut input_json = json!({
            "train": serde_json::to_value(&cfg.train)?, "steps": steps, "student": student,
            "data": data_hashes, "seed": seed, "dtype": cfg.run.dtype,
        });
        if job.replica.unfiltered {
            input_json["unfiltered"] = json!(true);
        }
        if let Some((_, _, id)) = &replay {
            input_json["replay_pool"] = json!(id);
        }
        if extra_has_ema(&cfg.train.extra) {
            // LoRA files trained with an EMA held the raw weights before
            // the fix of the trainer's save; retrain them.
            input_json["ema_saved"] = json!(true);
        }
        let input = hash_json(&input_json);
        if let Some(m) = plan
            .dir
            .done_with("train", &unit, &input, &[plan.dir.expert(file)])
        {
            ctx.done(&m);
            continue;
        }
        if !plan.wants(Stage::Train) {
            ctx.waiting
                .push((unit, "the train stage was not selected".into()));
            continue;
        }
        if let Some(sh) = plan.opts.shard {
            if !sh.owns(k) {
                ctx.waiting.push((
                    unit,
                    format!("belongs to shard {}/{}", k % sh.count, sh.count),
                ));
                continue;
            }
        }
        let run = plan.dir.expert_run(file);
        let marker = run.join("selma-input");
        let same = std::fs::read_to_string(&marker).is_ok_and(|s| s.trim() == input);
        if !same && run.exists() {
            std::fs::remove_dir_all(&run).with_context(|| format!("clearing {}", run.display()))?;
        }
        std::fs::create_dir_all(&run).with_context(|| format!("creating {}", run.display()))?;
        super::store::write_atomic(&marker, input.as_bytes())?;
        // A skill's kept images train its expert in place; the joint
        // baseline, unfiltered experts and replaying runs get a listing
        // under experts/.
        let data = if name != "joint" && !job.replica.unfiltered && replay.is_none() {
            plan.dir.images(name)
        } else {
            let mut rows = data_rows(plan, &skills, job.replica.unfiltered)?;
            if let (Some(r), Some((dir, reach, _))) = (&cfg.train.replay, &replay) {
                if pool.is_none() {
                    pool = Some(replay_rows_of(r, dir, reach)?);
                }
                let pool = pool.as_deref().unwrap_or_default();
                let extra = replay_rows(pool, rows.len(), r.share, derive_seed(seed, &["replay"]));
                rows.extend(extra);
            }
            write_data(plan, file, &rows)?
        };
        let t = &cfg.train;
        let tc = selma_train::trainer::TrainConfig {
            model: plan.student.clone(),
            data,
            out: plan.dir.expert(file),
            run_dir: Some(run.clone()),
            rank: t.rank,
            alpha: t.alpha,
            targets: t.targets.clone(),
            steps,
            batch: t.batch,
            grad_accum: t.grad_accum,
            lr: t.lr,
            lr_schedule: t.lr_schedule.clone(),
            warmup_steps: t.warmup_steps,
            resolution: t.resolution,
            seed,
            save_every: t.save_every,
            keep_checkpoints: 2,
            format: t.format.clone(),
            random_flip: t.random_flip,
            min_snr_gamma: t.min_snr_gamma,
            noise_offset: t.noise_offset,
            device: cfg.run.device.clone(),
            dtype: cfg.run.dtype.clone(),
            ..Default::default()
        };
        let tc = super::plan::apply_train_extra(tc, &t.extra)?;
        work.push(TrainWork {
            unit,
            input,
            file: file.to_string(),
            run: run.clone(),
            steps,
            resume: same && has_checkpoint(&run),
            config: tc,
        });
    }
    if work.is_empty() {
        return Ok(());
    }
    let parallel = trainers(plan, work.len());
    let total: u64 = work.iter().map(|w| w.steps).sum();
    let b = bar(plan.opts.progress, total, "updates");
    let finished = std::sync::Mutex::new(vec![]);
    let result = run_parallel(parallel, &work, |w| {
        let unit = &w.unit;
        let mut trainer = selma_train::trainer::Trainer::new(w.config.clone())
            .with_context(|| format!("training {unit}"))?;
        if w.resume {
            trainer
                .resume(&w.run)
                .with_context(|| format!("resuming {unit} from {}", w.run.display()))?;
            b.suspend(|| eprintln!("train: {unit}: resuming from step {}", trainer.state.step));
        } else {
            b.suspend(|| {
                eprintln!(
                    "train: {unit}: {} images, {} updates",
                    trainer.dataset.len(),
                    w.steps
                )
            });
        }
        let mut seen = trainer.state.step;
        b.inc(seen);
        let mut last = f64::NAN;
        trainer
            .run(|s| {
                b.inc(s.step - seen);
                seen = s.step;
                b.set_message(format!("{unit} loss {:.4}", s.loss));
                last = s.loss;
            })
            .with_context(|| format!("training {unit}"))?;
        let out = hash_file(&plan.dir.expert(&w.file))?;
        let mut m = manifest(Stage::Train, unit, &w.input, &out, true);
        m.counts.insert("updates".into(), w.steps as f64);
        m.counts
            .insert("images".into(), trainer.dataset.len() as f64);
        if last.is_finite() {
            m.counts.insert("last_loss".into(), last);
        }
        plan.dir.write_manifest(&m)?;
        finished.lock().expect("no panics hold it").push(m);
        Ok(())
    });
    b.finish_and_clear();
    result?;
    let mut finished = finished.into_inner().expect("workers are done");
    finished.sort_by(|a, c| a.unit.cmp(&c.unit));
    for m in finished {
        ctx.done(&m);
        ctx.ran.push(m.unit.clone());
    }
    Ok(())
}

// ---------------------------------------------------------------- merge

/// Merge the experts with every configured strategy.
pub fn merge(plan: &Plan, ctx: &mut Ctx) -> Result<()> {
    let cfg = &plan.loaded.cfg;
    for (r, mp) in plan
        .replicas()
        .into_iter()
        .flat_map(|r| plan.merges.iter().map(move |m| (r, m)))
    {
        let unit = format!("merged:{}{}", mp.name, r.suffix());
        let file = format!("{}{}", mp.name, r.file_suffix());
        let mut experts = vec![];
        let mut missing = None;
        for s in &plan.skills {
            match ctx.outputs.get(&format!("expert:{}{}", s.id, r.suffix())) {
                Some(h) => experts.push(h.clone()),
                None => missing = Some(s.id.clone()),
            }
        }
        if let Some(s) = missing {
            ctx.waiting
                .push((unit, format!("expert {s} is not trained")));
            continue;
        }
        let seed = derive_seed(plan.replica_seed(&r), &["merge", &mp.name]);
        let input = hash_json(&json!({
            "strategy": plan.plugin_id(&mp.spec), "params": serde_json::to_value(&mp.params)?,
            "weights": mp.weights, "rank": mp.rank, "experts": experts, "seed": seed,
            "format": cfg.train.format,
        }));
        if let Some(m) = plan
            .dir
            .done_with("merge", &unit, &input, &[plan.dir.merged(&file)])
        {
            ctx.done(&m);
            continue;
        }
        if !plan.wants(Stage::Merge) || plan.opts.shard.is_some() {
            ctx.waiting.push((
                unit,
                "merges run in an unsharded run with the merge stage".into(),
            ));
            continue;
        }
        eprintln!(
            "merge: {} experts with {} ({unit})",
            plan.skills.len(),
            mp.name
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
        let out_path = plan.dir.merged(&file);
        if let Some(p) = out_path.parent() {
            std::fs::create_dir_all(p)?;
        }
        let fmt: selma_lora::LoraFormat = cfg.train.format.parse()?;
        merged
            .save(&out_path, fmt)
            .with_context(|| format!("writing {}", out_path.display()))?;
        let mut m = manifest(Stage::Merge, &unit, &input, &hash_file(&out_path)?, true);
        m.counts.insert("layers".into(), merged.layers.len() as f64);
        plan.dir.write_manifest(&m)?;
        ctx.done(&m);
        ctx.ran.push(unit);
    }
    Ok(())
}

/// Error out when upstream work is missing and this was not a partial run.
pub fn require(ctx: &Ctx, unit: &str) -> Result<String> {
    match ctx.outputs.get(unit) {
        Some(h) => Ok(h.clone()),
        None => bail!("{unit} is not done"),
    }
}

#[cfg(test)]
mod tests {
    use super::{replay_rows, run_parallel};
    use serde_json::json;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// Every job runs exactly once, whatever the worker count.
    #[test]
    fn run_parallel_runs_each_job_once() {
        for workers in [1, 2, 5, 64] {
            let jobs: Vec<usize> = (0..37).collect();
            let seen = Mutex::new(vec![0u32; jobs.len()]);
            run_parallel(workers, &jobs, |&j| {
                seen.lock().unwrap()[j] += 1;
                Ok(())
            })
            .unwrap();
            assert!(
                seen.into_inner().unwrap().iter().all(|&c| c == 1),
                "{workers}"
            );
        }
    }

    /// A failing job stops the hand-out and its error is returned (the
    /// earliest failed job's, when several fail).
    #[test]
    fn run_parallel_returns_the_earliest_error() {
        let jobs: Vec<usize> = (0..1000).collect();
        let ran = AtomicUsize::new(0);
        let err = run_parallel(2, &jobs, |&j| {
            ran.fetch_add(1, Ordering::Relaxed);
            anyhow::ensure!(j != 3 && j != 7, "job {j} failed");
            Ok(())
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "job 3 failed");
        assert!(ran.load(Ordering::Relaxed) < 1000);
        let err = run_parallel(1, &jobs, |&j| {
            anyhow::ensure!(j != 7, "job {j} failed");
            Ok(())
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "job 7 failed");
    }

    /// Replay rows: round(k s / (1 - s)) of them, distinct while the pool
    /// lasts, then cycling; the same seed gives the same rows.
    #[test]
    fn replay_rows_share_distinctness_and_seed() {
        let pool: Vec<serde_json::Value> = (0..10).map(|i| json!({"file_name": i})).collect();
        let names = |rows: &[serde_json::Value]| -> Vec<i64> {
            rows.iter()
                .map(|r| r["file_name"].as_i64().unwrap())
                .collect()
        };
        // 7 skill rows at share 0.3 -> 3 replay rows; 14 at 0.5 -> 14.
        assert_eq!(replay_rows(&pool, 7, 0.3, 1).len(), 3);
        let many = names(&replay_rows(&pool, 14, 0.5, 1));
        assert_eq!(many.len(), 14);
        let mut first: Vec<i64> = many[..10].to_vec();
        first.sort();
        assert_eq!(first, (0..10).collect::<Vec<i64>>(), "a whole pass first");
        assert_eq!(&many[10..], &many[..4], "then the same order again");
        assert_eq!(many, names(&replay_rows(&pool, 14, 0.5, 1)));
        assert_ne!(many, names(&replay_rows(&pool, 14, 0.5, 2)));
        assert!(replay_rows(&pool, 0, 0.3, 1).is_empty());
    }
}
