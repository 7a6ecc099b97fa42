//! `selma prompts`: generate prompts for one skill with a generator plugin
//! and prompt filters, and write them to a JSON-lines file.

use crate::prompts::{run_job, Checkpoint, PromptsJob};
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;

/// Generate prompts for one skill: generator plugin + prompt filters.
#[derive(Args, Debug)]
pub struct PromptsArgs {
    /// The skill: a bundled name (general, paragraph, real-users, counting,
    /// counterfactual) or a path to a skill .wasm component.
    #[arg(long, value_name = "NAME|FILE.wasm")]
    pub skill: String,
    /// The prompt generator: a bundled name (llm-fewshot, template) or a .wasm path.
    #[arg(long, value_name = "NAME|FILE.wasm")]
    pub generator: String,
    /// A prompt filter (repeatable, applied in order), e.g. rouge-l, length, blocklist.
    #[arg(long = "filter", value_name = "NAME|FILE.wasm")]
    pub filters: Vec<String>,
    /// A plugin parameter, `plugin.key=value` (repeatable), e.g. rouge-l.threshold=0.7.
    #[arg(long = "param", value_name = "PLUGIN.KEY=VALUE")]
    pub params: Vec<String>,
    /// How many prompts to accept.
    #[arg(long, default_value_t = 1000)]
    pub count: usize,
    /// Output file (JSON lines: text, skill, generator, round), written
    /// atomically. Until it is written, the loop's state is kept in
    /// OUT.partial.json after every round: a run that fails (an LLM that
    /// stops answering) resumes there when run again with the same options.
    #[arg(long)]
    pub out: PathBuf,
    /// OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (vLLM,
    /// llama.cpp server, Ollama; this build speaks http only, no TLS).
    /// Giving it grants the llm to the generator.
    #[arg(long, value_name = "URL", visible_alias = "llm-url")]
    pub llm_endpoint: Option<String>,
    /// Model name sent to the endpoint.
    #[arg(long, value_name = "MODEL", requires = "llm_endpoint")]
    pub llm_model: Option<String>,
    /// Name of the environment variable that holds the API key (never printed).
    #[arg(long, value_name = "VAR", requires = "llm_endpoint")]
    pub llm_api_key_env: Option<String>,
    /// Use the chat API (/chat/completions) instead of /completions.
    #[arg(long, requires = "llm_endpoint")]
    pub llm_chat: bool,
    /// Also grant the llm to this plugin (by name; repeatable). The
    /// generator is granted automatically when --llm-endpoint is given.
    #[arg(long = "grant-llm", value_name = "PLUGIN")]
    pub grant_llm: Vec<String>,
    /// Seconds allowed for one LLM request.
    #[arg(long, default_value_t = 120, value_name = "SECS")]
    pub llm_timeout: u64,
    /// Retries of a failed LLM request (429, 5xx, connection errors).
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub llm_retries: u32,
    /// Seed of the plugins' random source (same seed, same prompts offline).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Give up after this many generator rounds.
    #[arg(long, default_value_t = 100)]
    pub max_rounds: u32,
    /// When fewer than --count prompts are reached, write them and succeed
    /// (with a warning) instead of failing.
    #[arg(long)]
    pub allow_partial: bool,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Run `selma prompts`.
pub fn run(args: PromptsArgs) -> Result<()> {
    if args.count == 0 {
        bail!("--count must be at least 1");
    }
    let llm = match &args.llm_endpoint {
        None => None,
        Some(endpoint) => {
            let Some(model) = &args.llm_model else {
                bail!("--llm-endpoint {endpoint} needs --llm-model (the model name the server serves)");
            };
            let mut cfg = selma_llm::LlmConfig::new(endpoint.clone(), model.clone());
            cfg.api_key_env = args.llm_api_key_env.clone();
            cfg.chat = args.llm_chat;
            cfg.timeout = Duration::from_secs(args.llm_timeout.max(1));
            cfg.max_retries = args.llm_retries;
            Some(cfg)
        }
    };
    let job = PromptsJob {
        skill: args.skill,
        generator: args.generator,
        filters: args.filters,
        params: args.params,
        count: args.count,
        max_rounds: args.max_rounds,
        seed: args.seed,
        llm,
        llm_grants: args.grant_llm,
        checkpoint: None,
    };
    let checkpoint = Checkpoint {
        path: checkpoint_path(&args.out),
        key: crate::pipeline::store::hash_json(&job.identity()),
    };
    let job = PromptsJob {
        checkpoint: Some(checkpoint.clone()),
        ..job
    };
    let outcome = run_job(&job, !args.quiet)?;
    selma_io::write_jsonl(&args.out, &outcome.records)?;
    checkpoint.remove()?;
    let s = &outcome.stats;
    eprintln!(
        "{} prompts written to {} ({} rounds, {} candidates, {} blank or duplicate, {} surplus)",
        s.accepted,
        args.out.display(),
        s.rounds,
        s.candidates,
        s.blank_or_duplicate,
        s.surplus
    );
    for f in &s.filters {
        match &f.last_reason {
            Some(r) => eprintln!("  filter {}: {} rejected (last: {r})", f.name, f.rejected),
            None => eprintln!("  filter {}: {} rejected", f.name, f.rejected),
        }
    }
    if !outcome.complete {
        let why = if s.stalled {
            format!(
                "the last {} rounds added nothing: the generator's space looks exhausted under these filters; \
                 loosen the filters, use another generator or lower --count",
                crate::prompts::STALL_ROUNDS
            )
        } else {
            "raise --max-rounds, loosen the filters or add seeds".to_string()
        };
        let msg = format!(
            "only {} of {} prompts accepted after {} rounds (written to {}); {why}",
            s.accepted,
            job.count,
            s.rounds,
            args.out.display()
        );
        if args.allow_partial {
            eprintln!("warning: {msg}");
        } else {
            bail!("{msg}, or pass --allow-partial to accept fewer");
        }
    }
    Ok(())
}

/// Where `selma prompts --out OUT` keeps its loop's state: `OUT.partial.json`.
fn checkpoint_path(out: &std::path::Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".partial.json");
    out.with_file_name(name)
}
