//! `selma run`: the whole SELMA pipeline from one TOML file (config, run
//! directory with per-unit manifests, resume, sharding, status).
//!
//! Data flow (DESIGN.md): per skill, prompts -> images (teacher) + image
//! filters -> one LoRA expert (student); the joint baseline on all skills'
//! data; merges of the experts; evaluation of base / experts / joint /
//! merges on held-out prompts -> results.json -> report.html.

pub mod claim;
pub mod config;
pub mod driver;
pub mod plan;
pub mod stages;
pub mod status;
pub mod store;
pub mod tables;
pub mod unit;
pub mod validate;

pub use config::{Loaded, Stage};
pub use plan::{Plan, RunOptions};
pub use store::Shard;
pub use validate::validate;

use anyhow::Result;
use std::path::PathBuf;

/// How often a worker looks again at units other workers are running.
const WAIT_POLL: std::time::Duration = std::time::Duration::from_millis(1000);

/// What one invocation did.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// The run directory.
    pub run_dir: PathBuf,
    /// Units run (not skipped).
    pub ran: Vec<String>,
    /// Units left for later (upstream not done, other shards, stages not selected).
    pub waiting: Vec<(String, String)>,
    /// The report, when it exists after this invocation.
    pub report: Option<PathBuf>,
}

/// Load the config (a file, or the embedded default).
pub fn load(opts: &RunOptions) -> Result<Loaded> {
    match &opts.config {
        Some(p) => Loaded::from_file(p),
        None => Loaded::embedded(),
    }
}

/// Validate, then run the selected stages; finished units are skipped.
pub fn run(opts: RunOptions) -> Result<RunSummary> {
    let loaded = load(&opts)?;
    let plan = validate(loaded, opts)?;
    execute(&plan)
}

/// The ablation and pass-rate tables of the run's results.json as text.
fn eval_results_text(plan: &Plan) -> Option<String> {
    let r = crate::eval::Results::read(&plan.dir.results()).ok()?;
    if stages::eval::ablation_mode(plan) {
        tables::ablation_text(&r)
    } else {
        tables::results_text(&r)
    }
}

/// Run a validated plan.
pub fn execute(plan: &Plan) -> Result<RunSummary> {
    std::fs::create_dir_all(&plan.dir.root)
        .map_err(|e| anyhow::anyhow!("creating run directory {}: {e}", plan.dir.root.display()))?;
    // What killed workers of this host left half written (never under a
    // final name) goes first.
    selma_io::sweep_stale_temps(&plan.dir.root)?;
    for s in &plan.opts.force {
        plan.dir.forget_stage(s.name())?;
        if *s == Stage::Images {
            for sk in &plan.skills {
                // Force re-rendering: the partial-images manifests go too.
                let d = plan.dir.images(&sk.id);
                if d.is_dir() {
                    std::fs::remove_dir_all(&d).ok();
                }
            }
        }
        if *s == Stage::Train {
            for j in plan.train_jobs() {
                std::fs::remove_dir_all(plan.dir.expert_run(&j.file)).ok();
            }
        }
        if *s == Stage::Eval {
            std::fs::remove_dir_all(plan.dir.eval().join("images")).ok();
        }
    }
    // Bookkeeping files, rewritten only when they change (a re-run with
    // nothing to do writes nothing).
    let mut summary = serde_json::to_vec_pretty(&plan::plan_summary(plan))?;
    summary.push(b'\n');
    for (path, bytes) in [
        (plan.dir.plan(), summary.as_slice()),
        (
            plan.dir.root.join("pipeline.toml"),
            plan.loaded.text.as_bytes(),
        ),
    ] {
        if std::fs::read(&path).ok().as_deref() != Some(bytes) {
            selma_io::write_atomic(&path, bytes)?;
        }
    }
    type StageFn = fn(&mut driver::Driver) -> Result<()>;
    let steps: [(Stage, StageFn); 6] = [
        (Stage::Prompts, stages::prompts::run),
        (Stage::Images, stages::images::run),
        (Stage::Train, stages::train::run),
        (Stage::Merge, stages::merge::run),
        (Stage::Eval, stages::eval::run),
        (Stage::Report, stages::report::run),
    ];
    // Passes over every stage until no unit is left to another live worker
    // (one pass when none shares the run directory, or with --no-wait).
    let mut ran = vec![];
    let mut told: Vec<unit::Unit> = vec![];
    let d = loop {
        let mut d = driver::Driver::new(plan);
        for (stage, f) in steps {
            let (t0, before) = (std::time::Instant::now(), d.ran.len());
            f(&mut d)?;
            let n = d.ran.len() - before;
            if n > 0 {
                eprintln!(
                    "{stage}: {n} unit(s) done in {:.1}s",
                    t0.elapsed().as_secs_f64()
                );
            }
        }
        ran.append(&mut d.ran);
        if d.busy.is_empty() || plan.opts.no_wait {
            break d;
        }
        if d.busy != told {
            let names: Vec<String> = d.busy.iter().map(|u| u.to_string()).collect();
            eprintln!(
                "waiting for {} unit(s) that other workers are running: {}",
                names.len(),
                names.join(", ")
            );
            told = d.busy.clone();
        }
        std::thread::sleep(WAIT_POLL);
    };
    let report = plan.dir.report();
    // A finished run prints its table (then the CLI prints the report's path).
    if d.waiting.is_empty() && report.is_file() {
        if let Some(t) = eval_results_text(plan) {
            print!("{t}");
        }
    }
    Ok(RunSummary {
        run_dir: plan.dir.root.clone(),
        ran: ran.iter().map(|u| u.to_string()).collect(),
        waiting: d.waiting,
        report: report.is_file().then_some(report),
    })
}
