//! The train stage. Units: `expert:<skill>` per skill and `joint` (one LoRA
//! on every skill's data), per replica (`/unfiltered`, `@seed<N>`). Inputs:
//! `[train]`, the update count, the student's identity, the output hashes of
//! the data units (`filter:<skill>`, or `images:<skill>` when unfiltered),
//! the seed, the dtype, the replay pool's identity and the salts below.
//! Shards split the adapters by index; small models train one adapter per
//! core. Outputs: `experts/<file>.safetensors` and `experts/<file>.run/`
//! (checkpoints, loss.jsonl): an interrupted adapter resumes from its last
//! checkpoint.

use super::images::image_name;
use super::replay;
use super::{bar, cpu_cores, run_parallel};
use crate::pipeline::driver::{Acquired, Claim, Counts, Driver, Gate, Pending};
use crate::pipeline::plan::{Plan, TrainJob};
use crate::pipeline::store::Manifest;
use crate::pipeline::store::{derive_seed, hash_file};
use crate::pipeline::unit::Unit;
use crate::prompts::PromptRecord;
use anyhow::{Context, Result};
use serde_json::json;
use std::path::{Path, PathBuf};

/// Salts of the train units' inputs: each marks a change of the trainer's
/// outputs for the same settings, so adapters trained before it are redone.
fn salts(plan: &Plan, input: &mut serde_json::Value) {
    if extra_has_ema(&plan.loaded.cfg.train.extra) {
        // LoRA files trained with an EMA held the raw weights before the
        // fix of the trainer's save.
        input["ema_saved"] = json!(true);
    }
}

/// Whether `[train.extra]` turns on an EMA of the LoRA weights.
fn extra_has_ema(extra: &toml::Table) -> bool {
    extra
        .get("ema_decay")
        .and_then(|v| v.as_float().or(v.as_integer().map(|i| i as f64)))
        .is_some_and(|d| d > 0.0)
}

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

/// A skill's training rows (`file_name`, `text`): the kept images, or every
/// rendered image when `unfiltered`.
fn skill_rows(plan: &Plan, skill: &str, unfiltered: bool) -> Result<Vec<serde_json::Value>> {
    if !unfiltered {
        return selma_io::read_jsonl(&plan.dir.images(skill).join("metadata.jsonl"));
    }
    let records: Vec<PromptRecord> = selma_io::read_jsonl(&plan.dir.prompts(skill))?;
    let mut rows = vec![];
    for (i, r) in records.iter().enumerate() {
        for j in 0..plan.loaded.cfg.images.per_prompt {
            rows.push(json!({"file_name": image_name(i, j), "text": r.text}));
        }
    }
    Ok(rows)
}

/// Preference pairs over several skills' draws (paths relative to
/// `experts/<file>.data/`): for each prompt, every image the filters kept
/// over every image they rejected (`verdicts.jsonl`), in file order.
fn pair_rows(plan: &Plan, skills: &[&str]) -> Result<Vec<serde_json::Value>> {
    #[derive(serde::Deserialize)]
    struct Verdict {
        file_name: String,
        text: String,
        keep: bool,
    }
    let mut rows = vec![];
    for s in skills {
        let path = plan.dir.images(s).join("verdicts.jsonl");
        let verdicts: Vec<Verdict> = selma_io::read_jsonl(&path)?;
        let mut by_prompt: Vec<(String, Vec<String>, Vec<String>)> = vec![];
        for v in verdicts {
            let f = format!("../../{s}/images/{}", v.file_name);
            let slot = match by_prompt.iter().position(|(t, _, _)| *t == v.text) {
                Some(i) => i,
                None => {
                    by_prompt.push((v.text.clone(), vec![], vec![]));
                    by_prompt.len() - 1
                }
            };
            if v.keep {
                by_prompt[slot].1.push(f);
            } else {
                by_prompt[slot].2.push(f);
            }
        }
        let before = rows.len();
        for (text, won, lost) in &by_prompt {
            for w in won {
                for l in lost {
                    rows.push(json!({"text": text, "winner": w, "loser": l}));
                }
            }
        }
        anyhow::ensure!(
            rows.len() > before,
            "skill {s}: no prompt has both a kept and a rejected image in {}, so objective = \"dpo\" has no pairs: draw more images per prompt (images.per_prompt)",
            path.display()
        );
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

/// One adapter this invocation may train.
struct Work {
    /// Taken by the worker thread that trains it.
    pending: std::sync::Mutex<Option<Pending>>,
    /// Skill id or `joint`.
    name: String,
    file: String,
    /// The rows of its data listing (None: the skill's kept images in place).
    listing: Option<Vec<serde_json::Value>>,
    /// The listing is preference pairs (`pairs.jsonl`).
    pairs: bool,
    steps: u64,
    seed: u64,
}

/// How a worker thread's adapter ended.
enum Ended {
    Trained(Unit, Manifest),
    Busy(Unit, String),
    DoneElsewhere(Unit, Manifest),
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

/// The trainer's settings for one adapter.
fn train_config(
    plan: &Plan,
    data: PathBuf,
    file: &str,
    run: &Path,
    steps: u64,
    seed: u64,
) -> Result<selma_train::trainer::TrainConfig> {
    let cfg = &plan.loaded.cfg;
    let t = &cfg.train;
    let tc = selma_train::trainer::TrainConfig {
        model: plan.student.clone(),
        data,
        out: plan.dir.expert(file),
        run_dir: Some(run.to_path_buf()),
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
        objective: t.objective,
        dpo_beta: t
            .dpo_beta
            .unwrap_or(selma_train::trainer::TrainConfig::default().dpo_beta),
        device: cfg.run.device.clone(),
        dtype: cfg.run.dtype.clone(),
        ..Default::default()
    };
    crate::pipeline::plan::apply_train_extra(tc, &t.extra)
}

/// Decides one adapter: its inputs, and its data listing when it is this
/// invocation's to train.
fn prepare(
    d: &mut Driver,
    k: usize,
    job: &TrainJob,
    pool: &Option<replay::Pool>,
    pool_rows: &mut Option<Vec<serde_json::Value>>,
) -> Result<Option<Work>> {
    let plan = d.plan;
    let cfg = &plan.loaded.cfg;
    let unit = job.unit();
    let name = job.name.as_str();
    let file = job.file.as_str();
    let skills: Vec<&str> = if name == "joint" {
        plan.skills.iter().map(|s| s.id.as_str()).collect()
    } else {
        vec![name]
    };
    // Filtered data comes from the filter unit; unfiltered from the images.
    let data_units: Vec<Unit> = skills
        .iter()
        .map(|s| {
            if job.replica.unfiltered {
                Unit::Images(s.to_string())
            } else {
                Unit::Filter(s.to_string())
            }
        })
        .collect();
    let Some(data_hashes) = d.upstream(&unit, &data_units) else {
        return Ok(None);
    };
    let student = d.model_id(&plan.student)?;
    let steps = if name == "joint" {
        cfg.train.joint_steps.unwrap_or(cfg.train.steps)
    } else {
        cfg.train.steps
    };
    let seed = derive_seed(plan.replica_seed(&job.replica), &["train", name]);
    let mut input = json!({
        "train": serde_json::to_value(&cfg.train)?, "steps": steps, "student": student,
        "data": data_hashes, "seed": seed, "dtype": cfg.run.dtype,
    });
    if job.replica.unfiltered {
        input["unfiltered"] = json!(true);
    }
    if let Some(p) = pool {
        input["replay_pool"] = json!(p.id);
    }
    salts(plan, &mut input);
    let out = plan.dir.expert(file);
    // Claimed when a worker thread starts it, so other processes can take
    // the adapters this one has not started yet.
    let Claim::Todo(pending) = d.decide(unit, &input, &[out], Gate::Shard(k)) else {
        return Ok(None);
    };
    // A skill's kept images train its expert in place; the joint baseline,
    // unfiltered experts and replaying runs get a listing under experts/.
    let pairs = cfg.train.objective == selma_train::config::Objective::Dpo;
    let listing = if pairs {
        Some(pair_rows(plan, &skills)?)
    } else if name != "joint" && !job.replica.unfiltered && pool.is_none() {
        None
    } else {
        let mut rows = data_rows(plan, &skills, job.replica.unfiltered)?;
        if let (Some(r), Some(p)) = (&cfg.train.replay, pool) {
            if pool_rows.is_none() {
                *pool_rows = Some(replay::rows_of(r, p)?);
            }
            let all = pool_rows.as_deref().unwrap_or_default();
            let extra = replay::mix_rows(all, rows.len(), r.share, derive_seed(seed, &["replay"]));
            rows.extend(extra);
        }
        Some(rows)
    };
    Ok(Some(Work {
        pending: std::sync::Mutex::new(Some(pending)),
        name: name.to_string(),
        file: file.to_string(),
        listing,
        pairs,
        steps,
        seed,
    }))
}

/// Sets up a claimed adapter's run folder (checkpoints of these very inputs
/// only) and data listing; returns its trainer settings and whether it
/// resumes from a checkpoint.
fn set_up(
    plan: &Plan,
    w: &Work,
    input: &str,
) -> Result<(selma_train::trainer::TrainConfig, PathBuf, bool)> {
    let run = plan.dir.expert_run(&w.file);
    let marker = run.join("selma-input");
    let same = std::fs::read_to_string(&marker).is_ok_and(|s| s.trim() == input);
    if !same && run.exists() {
        std::fs::remove_dir_all(&run).with_context(|| format!("clearing {}", run.display()))?;
    }
    std::fs::create_dir_all(&run).with_context(|| format!("creating {}", run.display()))?;
    selma_io::write_atomic(&marker, input.as_bytes())?;
    let data = match &w.listing {
        None => plan.dir.images(&w.name),
        Some(rows) => {
            let data = plan.dir.experts().join(format!("{}.data", w.file));
            let name = if w.pairs {
                selma_train::dataset::PAIRS_FILE
            } else {
                "metadata.jsonl"
            };
            selma_io::write_jsonl(&data.join(name), rows)?;
            data
        }
    };
    let config = train_config(plan, data, &w.file, &run, w.steps, w.seed)?;
    Ok((config, run.clone(), same && has_checkpoint(&run)))
}

/// Train every expert (this shard's share) and the joint baseline.
pub fn run(d: &mut Driver) -> Result<()> {
    let plan = d.plan;
    let pool = match &plan.loaded.cfg.train.replay {
        Some(r) => Some(replay::pool(plan, r)?),
        None => None,
    };
    // The pool's rows, read (and a ShapeWorld pool rendered) once, when the
    // first adapter that needs them trains.
    let mut pool_rows = None;
    let mut work = vec![];
    for (k, job) in plan.train_jobs().iter().enumerate() {
        if let Some(w) = prepare(d, k, job, &pool, &mut pool_rows)? {
            work.push(w);
        }
    }
    if work.is_empty() {
        return Ok(());
    }
    let parallel = trainers(plan, work.len());
    let total: u64 = work.iter().map(|w| w.steps).sum();
    let b = bar(plan.opts.progress, total, "updates");
    let ended = std::sync::Mutex::new(vec![]);
    let result = run_parallel(parallel, &work, |w| {
        let mut pending = w
            .pending
            .lock()
            .expect("no panics hold it")
            .take()
            .expect("each adapter is handed out once");
        let unit = pending.unit.clone();
        match pending.acquire(plan)? {
            Acquired::Mine => {}
            Acquired::Busy(why) => {
                b.inc(w.steps);
                ended
                    .lock()
                    .expect("no panics hold it")
                    .push(Ended::Busy(unit, why));
                return Ok(());
            }
            Acquired::Done(m) => {
                b.inc(w.steps);
                ended
                    .lock()
                    .expect("no panics hold it")
                    .push(Ended::DoneElsewhere(unit, m));
                return Ok(());
            }
        }
        let (config, run, resume) = set_up(plan, w, &pending.input)?;
        let mut trainer = selma_train::trainer::Trainer::new(config)
            .with_context(|| format!("training {unit}"))?;
        if resume {
            trainer
                .resume(&run)
                .with_context(|| format!("resuming {unit} from {}", run.display()))?;
            b.suspend(|| eprintln!("train: {unit}: resuming from step {}", trainer.state.step));
        } else {
            b.suspend(|| {
                if trainer.dataset.paired {
                    eprintln!(
                        "train: {unit}: {} preference pairs (kept over rejected draws), {} updates",
                        trainer.dataset.units(),
                        w.steps
                    )
                } else {
                    eprintln!(
                        "train: {unit}: {} images, {} updates",
                        trainer.dataset.len(),
                        w.steps
                    )
                }
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
        let mut counts = Counts::from([
            ("updates".into(), w.steps as f64),
            ("images".into(), trainer.dataset.len() as f64),
        ]);
        if last.is_finite() {
            counts.insert("last_loss".into(), last);
        }
        // Committed here, so an adapter finished before another one fails
        // (or the process is killed) stays done.
        let m = pending.commit(&plan.dir, &out, counts)?;
        ended
            .lock()
            .expect("no panics hold it")
            .push(Ended::Trained(unit, m));
        Ok(())
    });
    b.finish_and_clear();
    let mut ended = ended.into_inner().expect("workers are done");
    ended.sort_by_key(|e| match e {
        Ended::Trained(u, _) | Ended::Busy(u, _) | Ended::DoneElsewhere(u, _) => u.to_string(),
    });
    for e in ended {
        match e {
            Ended::Trained(u, m) => d.record(u, m),
            Ended::Busy(u, why) => d.busy(u, why),
            Ended::DoneElsewhere(u, m) => d.done_elsewhere(u, m),
        }
    }
    result
}
