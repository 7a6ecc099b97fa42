//! `selma run`: the whole SELMA pipeline from one TOML file.

use crate::pipeline::{self, RunOptions, Shard, Stage};
use anyhow::Result;
use clap::Args;
use std::io::IsTerminal;
use std::path::PathBuf;

/// Run the whole SELMA pipeline from a pipeline.toml.
///
/// Per skill: prompts (skill + generator + filters) -> images from the
/// teacher model (image filters keep or drop them) -> one LoRA expert on the
/// student model; the joint baseline on all skills' data; merges of the
/// experts; evaluation of base, experts, joint and merges on held-out prompts
/// -> results.json and report.html. Without a file it runs the embedded
/// default (examples/tiny.toml: the tiny random model, all five skills).
///
/// Every unit of work records the hash of its inputs: a re-run skips what is
/// done and redoes only what changed; a killed run resumes where it stopped.
/// Several `selma run` processes on one run directory (without --shard)
/// split the work: each unit is claimed before it runs, so none is done
/// twice at the same time, and a process with nothing left to start waits
/// for the units others are running (or leaves them, with --no-wait). With
/// --shard i/n, n processes (Slurm array, Kubernetes indexed Job) split
/// image generation and expert training by index instead; a later run
/// without --shard merges, evaluates and reports.
///
/// Example: selma run examples/sd15.toml --run-dir /shared/runs/sd15
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The pipeline.toml (default: the embedded examples/tiny.toml).
    #[arg(value_name = "PIPELINE.toml")]
    pub config: Option<PathBuf>,
    /// Run directory (default: run.dir of the config, else runs/<config name>).
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// Do this shard's share of image generation and expert training (i/n, from 0).
    #[arg(long, value_name = "i/n")]
    pub shard: Option<Shard>,
    /// Only these stages (comma-separated): prompts,images,train,merge,eval,report.
    #[arg(long, value_delimiter = ',', value_name = "STAGES")]
    pub stages: Option<Vec<Stage>>,
    /// Redo a stage even if it is done (repeatable).
    #[arg(long, value_name = "STAGE")]
    pub force: Vec<Stage>,
    /// Print the commented default config (a template) and exit.
    #[arg(long)]
    pub print_default_config: bool,
    /// No progress bars.
    #[arg(long, short)]
    pub quiet: bool,
    /// Do not wait for units other workers on this run directory are running.
    #[arg(long)]
    pub no_wait: bool,
}

/// Run `selma run`.
pub fn run(a: RunArgs) -> Result<()> {
    if a.print_default_config {
        print!("{}", pipeline::config::DEFAULT_CONFIG);
        return Ok(());
    }
    let opts = RunOptions {
        config: a.config,
        run_dir: a.run_dir,
        shard: a.shard,
        stages: a.stages,
        force: a.force,
        progress: !a.quiet && std::io::stderr().is_terminal(),
        no_wait: a.no_wait,
    };
    resume_hint_on_interrupt(&opts);
    let t0 = std::time::Instant::now();
    let s = pipeline::run(opts)?;
    if s.ran.is_empty() {
        eprintln!("nothing to do: every selected unit is already done");
    } else {
        eprintln!(
            "ran {} unit(s) in {:.1}s: {}",
            s.ran.len(),
            t0.elapsed().as_secs_f64(),
            s.ran.join(", ")
        );
        eprintln!("state of every stage: selma status {}", s.run_dir.display());
    }
    if !s.waiting.is_empty() {
        eprintln!("left for a later run:");
        for (u, why) in &s.waiting {
            eprintln!("  {u}: {why}");
        }
    }
    match &s.report {
        Some(r) if s.waiting.is_empty() => println!("report: {}", r.display()),
        _ => println!(
            "run directory: {} (not finished; `selma status {}`)",
            s.run_dir.display(),
            s.run_dir.display()
        ),
    }
    Ok(())
}

/// The message Ctrl-C prints: how to resume this very run.
static RESUME_HINT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();

extern "C" fn on_interrupt(_: libc::c_int) {
    // Only async-signal-safe calls: write(2) and _exit(2).
    if let Some(m) = RESUME_HINT.get() {
        unsafe {
            libc::write(2, m.as_ptr().cast(), m.len());
        }
    }
    unsafe { libc::_exit(130) }
}

/// On Ctrl-C (SIGINT) or SIGTERM: say that finished units are kept and how
/// to resume, then exit 130 at once (the unit in progress is redone, its
/// temp files are swept by the next run).
fn resume_hint_on_interrupt(opts: &RunOptions) {
    let mut cmd = String::from("selma run");
    if let Some(c) = &opts.config {
        cmd.push_str(&format!(" {}", c.display()));
    }
    if let Some(d) = &opts.run_dir {
        cmd.push_str(&format!(" --run-dir {}", d.display()));
    }
    if let Some(s) = &opts.shard {
        cmd.push_str(&format!(" --shard {}/{}", s.index, s.count));
    }
    let msg = format!("\ninterrupted: finished units are kept; resume with: {cmd}\n");
    if RESUME_HINT.set(msg.into_bytes()).is_ok() {
        let handler: extern "C" fn(libc::c_int) = on_interrupt;
        unsafe {
            libc::signal(libc::SIGINT, handler as libc::sighandler_t);
            libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
        }
    }
}
