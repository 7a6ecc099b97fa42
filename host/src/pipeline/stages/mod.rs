//! The stages of a run, one file each; every file says which units it has,
//! what their inputs are and how to run one, and goes through the
//! [`Driver`](super::driver::Driver) for the done check, gating and manifests.
//! This file holds what several stages share: the model loader, progress
//! bars and the parallel job runner.

pub mod eval;
pub mod images;
pub mod merge;
pub mod prompts;
pub mod render;
pub mod replay;
pub mod report;
pub mod train;

use super::plan::Plan;
use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::Path;

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

/// Load a diffusers folder with the run's device and dtype.
pub fn load_model(plan: &Plan, dir: &Path) -> Result<selma_diffusion::pipeline::StableDiffusion> {
    use anyhow::Context;
    let device = selma_diffusion::pipeline::parse_device(&plan.loaded.cfg.run.device)?;
    let dtype = selma_diffusion::pipeline::parse_dtype(&plan.loaded.cfg.run.dtype)?;
    selma_diffusion::pipeline::StableDiffusion::load(dir, &device, dtype)
        .with_context(|| format!("loading the model {}", dir.display()))
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

/// The cores selma uses: RAYON_NUM_THREADS when set, else every core.
pub fn cpu_cores() -> usize {
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

#[cfg(test)]
mod tests {
    use super::run_parallel;
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
}
