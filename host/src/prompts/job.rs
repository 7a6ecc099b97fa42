//! One prompts job from plugin specs to accepted prompts: loads the skill,
//! generator and filter plugins through `selma_runtime`, lends them the
//! `selma_llm` client as their `llm`, runs [`run_loop`] with a progress bar,
//! and keeps the loop's state in a checkpoint file after every round, so a
//! job that fails (an LLM that stops answering) resumes where it stopped.

use super::{run_loop, CandidateFilter, CandidateSource, LoopOutcome, LoopSpec, LoopState};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Lends a `selma_llm` client to plugins as their `llm` import.
pub struct LlmClientBackend(pub selma_llm::LlmClient);

impl selma_runtime::LlmBackend for LlmClientBackend {
    fn complete(&self, req: &selma_runtime::CompletionRequest) -> Result<Vec<String>> {
        self.0.complete(&selma_llm::CompletionRequest {
            prompt: req.prompt.clone(),
            system: req.system.clone(),
            temperature: req.temperature,
            top_p: req.top_p,
            max_tokens: req.max_tokens,
            n: req.n,
            stop: req.stop.clone(),
        })
    }
}

/// Everything `selma prompts` needs to produce one skill's prompts.
#[derive(Clone, Debug)]
pub struct PromptsJob {
    /// Skill spec: a bundled name or a `.wasm` path.
    pub skill: String,
    /// Generator spec.
    pub generator: String,
    /// Filter specs, applied in order.
    pub filters: Vec<String>,
    /// `plugin.key=value` parameters; `plugin` is a plugin's name.
    pub params: Vec<String>,
    /// Prompts to accept.
    pub count: usize,
    /// Generator rounds before giving up.
    pub max_rounds: u32,
    /// Seed of the plugins' random source.
    pub seed: u64,
    /// The LLM endpoint; when set, the generator is granted the `llm` import.
    pub llm: Option<selma_llm::LlmConfig>,
    /// Further plugin names granted the `llm` import.
    pub llm_grants: Vec<String>,
    /// Where the loop's state is kept after every round (None: nowhere).
    pub checkpoint: Option<Checkpoint>,
}

impl PromptsJob {
    /// What makes two jobs the same job (their prompts the same): every
    /// input but the progress display and the checkpoint itself.
    pub fn identity(&self) -> serde_json::Value {
        serde_json::json!({
            "skill": self.skill, "generator": self.generator, "filters": self.filters,
            "params": self.params, "count": self.count, "max_rounds": self.max_rounds,
            "seed": self.seed, "llm_grants": self.llm_grants,
            "llm": self.llm.as_ref().map(|l| (&l.endpoint, &l.model, l.chat)),
        })
    }
}

/// A job's checkpoint: the file that holds its loop's state after every
/// round, and the key (a hash of the job's inputs) that says whose it is.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// The file (written atomically).
    pub path: PathBuf,
    /// The job's identity; a file with another key is not resumed.
    pub key: String,
}

#[derive(Serialize, Deserialize)]
struct CheckpointFile {
    key: String,
    state: LoopState,
}

impl Checkpoint {
    /// The saved state, if the file exists and belongs to this job. A file
    /// of another job (its inputs changed) is ignored and later overwritten.
    pub fn load(&self) -> Result<Option<LoopState>> {
        if !self.path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&self.path)
            .with_context(|| format!("reading the prompts checkpoint {}", self.path.display()))?;
        let file: CheckpointFile = serde_json::from_str(&text).with_context(|| {
            format!(
                "the prompts checkpoint {} is not a saved loop state: delete it to start afresh",
                self.path.display()
            )
        })?;
        Ok((file.key == self.key).then_some(file.state))
    }

    /// Keep `state` (atomically: a kill leaves the previous round's state).
    pub fn save(&self, state: &LoopState) -> Result<()> {
        selma_io::write_json(
            &self.path,
            &CheckpointFile {
                key: self.key.clone(),
                state: state.clone(),
            },
        )
    }

    /// Remove the file once the job's output is written.
    pub fn remove(&self) -> Result<()> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", self.path.display())),
        }
    }
}

/// Split `plugin.key=value` parameters by plugin name; errors name the bad one.
pub fn split_params(params: &[String]) -> Result<Vec<(String, String, String)>> {
    params
        .iter()
        .map(|p| {
            let (lhs, value) = p.split_once('=').with_context(|| {
                format!("parameter {p:?} is not of the form plugin.key=value")
            })?;
            let (plugin, key) = lhs.split_once('.').with_context(|| {
                format!("parameter {p:?} does not name its plugin: write plugin.key=value (e.g. rouge-l.threshold=0.7)")
            })?;
            if plugin.is_empty() || key.is_empty() {
                bail!("parameter {p:?} is not of the form plugin.key=value");
            }
            Ok((plugin.to_string(), key.to_string(), value.to_string()))
        })
        .collect()
}

/// Whether a plugin spec names a file rather than a bundled plugin.
fn is_path_spec(spec: &str) -> bool {
    spec.ends_with(".wasm") || spec.contains('/') || spec.contains(std::path::MAIN_SEPARATOR)
}

/// This plugin's `(key, value)` pairs out of all parameters.
fn params_for(all: &[(String, String, String)], plugin: &str) -> Vec<(String, String)> {
    all.iter()
        .filter(|(p, _, _)| p == plugin)
        .map(|(_, k, v)| (k.clone(), v.clone()))
        .collect()
}

struct GeneratorSource {
    name: String,
    plugin: selma_runtime::GeneratorPlugin,
    skill: selma_runtime::SkillInfo,
    params: selma_runtime::Params,
    llm_granted: bool,
}

impl CandidateSource for GeneratorSource {
    fn name(&self) -> &str {
        &self.name
    }
    fn generate(&mut self, pool: &[String], wanted: u32, round: u32) -> Result<Vec<String>> {
        let out = self
            .plugin
            .generate(&self.skill, pool, wanted, round, &self.params);
        match out {
            Ok(v) => Ok(v),
            Err(e) if !self.llm_granted => Err(e.context(
                "no LLM endpoint was given: if this generator needs one, pass --llm-endpoint URL --llm-model MODEL \
                 (any OpenAI-compatible server: vLLM, llama.cpp, Ollama), which grants it the llm, \
                 or use the offline `template` generator",
            )),
            Err(e) => Err(e),
        }
    }
    fn random_state(&self) -> Option<u64> {
        Some(self.plugin.random_state())
    }
    fn set_random_state(&mut self, state: u64) {
        self.plugin.set_random_state(state)
    }
}

struct FilterJudge {
    name: String,
    plugin: selma_runtime::PromptFilterPlugin,
    params: selma_runtime::Params,
}

impl CandidateFilter for FilterJudge {
    fn name(&self) -> &str {
        &self.name
    }
    fn judge(
        &mut self,
        candidates: &[String],
        pool: &[String],
    ) -> Result<Vec<(bool, Option<String>)>> {
        Ok(self
            .plugin
            .filter(candidates, pool, &self.params)?
            .into_iter()
            .map(|v| (v.keep, v.reason))
            .collect())
    }
    fn random_state(&self) -> Option<u64> {
        Some(self.plugin.random_state())
    }
    fn set_random_state(&mut self, state: u64) {
        self.plugin.set_random_state(state)
    }
}

/// Load the plugins of `job`, run the loop (with a progress bar when
/// `progress`), and return the accepted prompts and stats. With a
/// checkpoint, a saved state of this job is resumed and the state is saved
/// after every round; the caller removes it once the output is written.
pub fn run_job(job: &PromptsJob, progress: bool) -> Result<LoopOutcome> {
    run_job_excluding(job, &[], progress)
}

/// [`run_job`] where the prompts of `exclude` count as already seen (never accepted).
pub fn run_job_excluding(
    job: &PromptsJob,
    exclude: &[String],
    progress: bool,
) -> Result<LoopOutcome> {
    let params = split_params(&job.params)?;
    let mut config = selma_runtime::RuntimeConfig {
        seed: job.seed,
        ..Default::default()
    };
    let llm_granted = job.llm.is_some();
    config.llm_grants = job.llm_grants.clone();
    if let Some(llm) = &job.llm {
        // Grants are by plugin name; a .wasm file's name is in its metadata.
        let name = if is_path_spec(&job.generator) {
            let probe = selma_runtime::Runtime::new(config.clone())?;
            probe
                .inspect(&job.generator)
                .with_context(|| format!("loading generator {:?}", job.generator))?
                .name
        } else {
            job.generator.clone()
        };
        let client = selma_llm::LlmClient::new(llm.clone())
            .context("configuring the LLM client (--llm-* options)")?;
        config.llm = Some(std::sync::Arc::new(LlmClientBackend(client)));
        config.llm_grants.push(name);
    }
    // Plugin logs go through the progress bar (see `forward_logs`).
    config.log_to_stderr = false;
    let runtime = selma_runtime::Runtime::new(config)?;

    let mut skill_plugin = runtime
        .skill(&job.skill)
        .with_context(|| format!("loading skill {:?}", job.skill))?;
    let skill = skill_plugin.info()?;
    if skill.seeds.is_empty() {
        bail!("skill {:?} has no seed prompts", skill.id);
    }

    let mut known = Vec::new();
    let generator = runtime
        .generator(&job.generator)
        .with_context(|| format!("loading generator {:?}", job.generator))?;
    let gen_name = generator.metadata().name.clone();
    known.push(gen_name.clone());
    let gen_params = generator.params(&params_for(&params, &gen_name))?;
    let mut source = GeneratorSource {
        name: gen_name,
        plugin: generator,
        skill: skill.clone(),
        params: gen_params,
        llm_granted,
    };

    let mut judges = Vec::new();
    for spec in &job.filters {
        let plugin = runtime
            .prompt_filter(spec)
            .with_context(|| format!("loading prompt filter {spec:?}"))?;
        let name = plugin.metadata().name.clone();
        known.push(name.clone());
        let p = plugin.params(&params_for(&params, &name))?;
        judges.push(FilterJudge {
            name,
            plugin,
            params: p,
        });
    }
    // Skills take no parameters at call time, but a typo should still fail.
    let skill_name = skill_plugin.name().to_string();
    skill_plugin.params(&params_for(&params, &skill_name))?;
    known.push(skill_name);
    for (plugin, key, _) in &params {
        if !known.contains(plugin) {
            bail!(
                "parameter {plugin}.{key}: no loaded plugin is named {plugin:?} (loaded: {})",
                known.join(", ")
            );
        }
    }

    let bar = if progress {
        indicatif::ProgressBar::new(job.count as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} prompts ({elapsed})")
            .expect("static template")
            .progress_chars("=> "),
    );
    let resume = match &job.checkpoint {
        Some(c) => c.load()?,
        None => None,
    };
    if let (Some(st), Some(c)) = (&resume, &job.checkpoint) {
        eprintln!(
            "{}: resuming at round {} with {} prompts accepted (from {}; delete it to start afresh)",
            skill.id,
            st.round,
            st.records.len(),
            c.path.display()
        );
        bar.set_position(st.records.len() as u64);
    }
    bar.set_message(format!(
        "{}: round {}",
        skill.id,
        resume.as_ref().map_or(0, |s| s.round)
    ));
    let skill_id = skill.id.clone();
    let mut filters: Vec<&mut dyn CandidateFilter> = judges
        .iter_mut()
        .map(|j| j as &mut dyn CandidateFilter)
        .collect();
    let spec = LoopSpec {
        skill_id: &skill_id,
        seeds: &skill.seeds,
        exclude,
        count: job.count,
        max_rounds: job.max_rounds,
    };
    let mut kept: Option<(u32, usize)> = resume.as_ref().map(|s| (s.round, s.records.len()));
    let outcome = run_loop(&spec, &mut source, &mut filters, resume, &mut |st| {
        forward_logs(&runtime, &bar, progress);
        bar.set_position(st.records.len() as u64);
        bar.set_message(format!("{skill_id}: round {}", st.round));
        if let Some(c) = &job.checkpoint {
            c.save(st)?;
            kept = Some((st.round, st.records.len()));
        }
        Ok(())
    });
    forward_logs(&runtime, &bar, progress);
    bar.finish_and_clear();
    match (outcome, &job.checkpoint, kept) {
        (Err(e), Some(c), Some((round, n))) => Err(e.context(format!(
            "{n} prompts accepted in the {round} rounds before are kept in {}: run the same \
             command again to resume at round {round}",
            c.path.display()
        ))),
        (outcome, _, _) => outcome,
    }
}

/// Print the plugins' log lines above the progress bar: info and up, or
/// only warnings and errors when `verbose` is off.
fn forward_logs(runtime: &selma_runtime::Runtime, bar: &indicatif::ProgressBar, verbose: bool) {
    use selma_runtime::LogLevel;
    for line in runtime.drain_logs() {
        let level = match line.level {
            LogLevel::Debug => continue,
            LogLevel::Info if !verbose => continue,
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        };
        let text = format!("[{}] {level}: {}", line.plugin, line.message);
        if bar.is_hidden() {
            eprintln!("{text}");
        } else {
            bar.println(text);
        }
    }
}
