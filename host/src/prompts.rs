//! Prompt generation for one skill: the generate -> filter loop.
//!
//! Owns: the round loop (a generator plugin proposes candidates, the host
//! drops blanks and exact duplicates, each prompt filter judges the survivors
//! in order against the pool = seeds + accepted prompts), its statistics, the
//! atomic `prompts.jsonl` writer, and the glue that loads the plugins through
//! `selma_runtime` and lends them the `selma_llm` client as their `llm`.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// One accepted prompt, one line of `prompts.jsonl`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptRecord {
    pub text: String,
    /// The skill's id (e.g. `counting`).
    pub skill: String,
    /// The generator plugin's name (e.g. `llm-fewshot`).
    pub generator: String,
    /// The 0-based round in which it was accepted.
    pub round: u32,
}

/// Something that proposes candidate prompts (a generator plugin).
pub trait CandidateSource {
    /// The name used in records, stats and errors.
    fn name(&self) -> &str;
    /// Candidates for this round; `pool` is seeds + accepted prompts.
    fn generate(&mut self, pool: &[String], wanted: u32, round: u32) -> Result<Vec<String>>;
}

/// A judge of candidates (a prompt-filter plugin).
pub trait CandidateFilter {
    /// The name used in stats and errors.
    fn name(&self) -> &str;
    /// One `(keep, reason)` per candidate, judged in order against `pool`.
    fn judge(
        &mut self,
        candidates: &[String],
        pool: &[String],
    ) -> Result<Vec<(bool, Option<String>)>>;
}

/// How many prompts a filter turned down, and its most recent reason.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FilterStats {
    pub name: String,
    pub rejected: usize,
    pub last_reason: Option<String>,
}

/// What happened over the whole loop.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LoopStats {
    /// Rounds run (generator calls).
    pub rounds: u32,
    /// Candidates the generator returned, all rounds together.
    pub candidates: usize,
    /// Blank candidates and exact (whitespace-trimmed) repeats of anything
    /// seen before (pool, or an earlier candidate, rejected ones included),
    /// dropped by the host before the filters.
    pub blank_or_duplicate: usize,
    /// Per filter, in the order they ran.
    pub filters: Vec<FilterStats>,
    /// Candidates that passed every filter after the target was reached.
    pub surplus: usize,
    /// Prompts accepted.
    pub accepted: usize,
    /// The loop stopped early: [`STALL_ROUNDS`] rounds in a row added nothing.
    pub stalled: bool,
}

/// Consecutive rounds without a new prompt after which the loop gives up
/// (the generator's space is exhausted under the filters).
pub const STALL_ROUNDS: u32 = 10;

/// The loop's result: accepted prompts (in acceptance order) and stats.
#[derive(Clone, Debug)]
pub struct LoopOutcome {
    pub records: Vec<PromptRecord>,
    pub stats: LoopStats,
    /// Whether `count` prompts were reached within `max_rounds`.
    pub complete: bool,
}

/// Run rounds until `count` prompts are accepted or `max_rounds` have run.
///
/// `on_progress(accepted, round)` is called after every round.
pub fn run_loop(
    skill_id: &str,
    seeds: &[String],
    source: &mut dyn CandidateSource,
    filters: &mut [&mut dyn CandidateFilter],
    count: usize,
    max_rounds: u32,
    on_progress: &mut dyn FnMut(usize, u32),
) -> Result<LoopOutcome> {
    run_loop_excluding(
        skill_id,
        seeds,
        &[],
        source,
        filters,
        count,
        max_rounds,
        on_progress,
    )
}

/// [`run_loop`], also treating every prompt of `exclude` as already seen
/// (held-out evaluation prompts that must not repeat training prompts).
#[allow(clippy::too_many_arguments)]
pub fn run_loop_excluding(
    skill_id: &str,
    seeds: &[String],
    exclude: &[String],
    source: &mut dyn CandidateSource,
    filters: &mut [&mut dyn CandidateFilter],
    count: usize,
    max_rounds: u32,
    on_progress: &mut dyn FnMut(usize, u32),
) -> Result<LoopOutcome> {
    let mut pool: Vec<String> = seeds.iter().map(|s| s.trim().to_string()).collect();
    let mut seen: HashSet<String> = pool.iter().cloned().collect();
    seen.extend(exclude.iter().map(|s| s.trim().to_string()));
    let mut records = Vec::new();
    let mut stats = LoopStats {
        filters: filters
            .iter()
            .map(|f| FilterStats {
                name: f.name().to_string(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let generator = source.name().to_string();
    let mut round = 0u32;
    let mut idle_rounds = 0u32;
    while records.len() < count && round < max_rounds {
        let before = records.len();
        let wanted = wanted_hint(count - records.len(), records.len(), stats.candidates);
        let raw = source
            .generate(&pool, wanted, round)
            .with_context(|| format!("generator {generator:?} failed in round {round}"))?;
        stats.rounds += 1;
        stats.candidates += raw.len();
        let mut candidates = Vec::with_capacity(raw.len());
        for c in raw {
            let c = c.trim().to_string();
            if c.is_empty() || !seen.insert(c.clone()) {
                stats.blank_or_duplicate += 1;
            } else {
                candidates.push(c);
            }
        }
        for (f, fstats) in filters.iter_mut().zip(stats.filters.iter_mut()) {
            if candidates.is_empty() {
                break;
            }
            let verdicts = f
                .judge(&candidates, &pool)
                .with_context(|| format!("filter {:?} failed in round {round}", fstats.name))?;
            if verdicts.len() != candidates.len() {
                bail!(
                    "filter {:?} returned {} verdicts for {} candidates in round {round}; a filter must judge every candidate",
                    fstats.name,
                    verdicts.len(),
                    candidates.len()
                );
            }
            let mut kept = Vec::with_capacity(candidates.len());
            for (c, (keep, reason)) in candidates.into_iter().zip(verdicts) {
                if keep {
                    kept.push(c);
                } else {
                    fstats.rejected += 1;
                    if reason.is_some() {
                        fstats.last_reason = reason;
                    }
                }
            }
            candidates = kept;
        }
        for c in candidates {
            if records.len() < count {
                pool.push(c.clone());
                records.push(PromptRecord {
                    text: c,
                    skill: skill_id.to_string(),
                    generator: generator.clone(),
                    round,
                });
            } else {
                stats.surplus += 1;
            }
        }
        round += 1;
        on_progress(records.len(), round);
        idle_rounds = if records.len() == before {
            idle_rounds + 1
        } else {
            0
        };
        if idle_rounds >= STALL_ROUNDS && records.len() < count {
            stats.stalled = true;
            break;
        }
    }
    stats.accepted = records.len();
    Ok(LoopOutcome {
        complete: records.len() >= count,
        records,
        stats,
    })
}

/// How many candidates to ask for: the remaining count divided by the
/// acceptance rate so far (at least 5%), at least the remaining count and
/// at most 20x it or 1000, whichever is less (filter cost grows with the
/// square of a batch).
fn wanted_hint(remaining: usize, accepted: usize, candidates: usize) -> u32 {
    let rate = if candidates == 0 {
        1.0
    } else {
        (accepted as f64 / candidates as f64).max(0.05)
    };
    let want = (remaining as f64 / rate).ceil() as usize;
    let cap = remaining.max(remaining.saturating_mul(20).min(1000));
    want.clamp(remaining, cap).min(u32::MAX as usize) as u32
}

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
}

/// Load the plugins of `job`, run the loop (with a progress bar when
/// `progress`), and return the accepted prompts and stats.
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
    bar.set_message(format!("{}: round 0", skill.id));
    let skill_id = skill.id.clone();
    let mut filters: Vec<&mut dyn CandidateFilter> = judges
        .iter_mut()
        .map(|j| j as &mut dyn CandidateFilter)
        .collect();
    let outcome = run_loop_excluding(
        &skill_id,
        &skill.seeds,
        exclude,
        &mut source,
        &mut filters,
        job.count,
        job.max_rounds,
        &mut |accepted, round| {
            forward_logs(&runtime, &bar, progress);
            bar.set_position(accepted as u64);
            bar.set_message(format!("{skill_id}: round {round}"));
        },
    );
    forward_logs(&runtime, &bar, progress);
    bar.finish_and_clear();
    outcome
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Emits a fixed list per round.
    struct Scripted {
        rounds: Vec<Vec<&'static str>>,
        seen_pools: Vec<Vec<String>>,
        wanted: Vec<u32>,
    }

    impl CandidateSource for Scripted {
        fn name(&self) -> &str {
            "scripted"
        }
        fn generate(&mut self, pool: &[String], wanted: u32, round: u32) -> Result<Vec<String>> {
            self.seen_pools.push(pool.to_vec());
            self.wanted.push(wanted);
            Ok(self
                .rounds
                .get(round as usize)
                .map(|r| r.iter().map(|s| s.to_string()).collect())
                .unwrap_or_default())
        }
    }

    /// Rejects candidates containing a word, and checks the pool it is given.
    struct Reject(&'static str, Vec<usize>);

    impl CandidateFilter for Reject {
        fn name(&self) -> &str {
            self.0
        }
        fn judge(&mut self, c: &[String], pool: &[String]) -> Result<Vec<(bool, Option<String>)>> {
            self.1.push(pool.len());
            Ok(c.iter()
                .map(|s| {
                    let bad = s.contains(self.0);
                    (!bad, bad.then(|| format!("contains {}", self.0)))
                })
                .collect())
        }
    }

    #[test]
    fn loop_filters_dedups_and_stops_at_count() {
        let mut gen = Scripted {
            rounds: vec![
                vec!["seed one", " a cat ", "", "a dog", "a cat", "bad apple"],
                vec!["ugly cow", "a bird", "bad egg", "a fish", "a frog"],
            ],
            seen_pools: vec![],
            wanted: vec![],
        };
        let mut bad = Reject("bad", vec![]);
        let mut ugly = Reject("ugly", vec![]);
        let seeds = vec!["seed one".to_string(), "seed two".to_string()];
        let mut progress = vec![];
        let out = run_loop(
            "s",
            &seeds,
            &mut gen,
            &mut [&mut bad, &mut ugly],
            4,
            10,
            &mut |a, r| progress.push((a, r)),
        )
        .unwrap();
        let texts: Vec<&str> = out.records.iter().map(|r| r.text.as_str()).collect();
        assert_eq!(texts, ["a cat", "a dog", "a bird", "a fish"]);
        let rounds: Vec<u32> = out.records.iter().map(|r| r.round).collect();
        assert_eq!(rounds, [0, 0, 1, 1]);
        assert!(out.complete);
        assert_eq!(progress, [(2, 1), (4, 2)]);
        let s = &out.stats;
        assert_eq!((s.rounds, s.candidates, s.accepted), (2, 11, 4));
        // "seed one" (pool), "" and the second "a cat".
        assert_eq!(s.blank_or_duplicate, 3);
        assert_eq!(s.filters[0].rejected, 2);
        assert_eq!(s.filters[0].last_reason.as_deref(), Some("contains bad"));
        assert_eq!(s.filters[1].rejected, 1);
        assert_eq!(s.surplus, 1); // "a frog"
                                  // Round 0: 4 wanted; then 2 remain at an acceptance rate of 2/6.
        assert_eq!(gen.wanted, [4, 6]);
        // Round 1 sees seeds + the 2 accepted in round 0.
        assert_eq!(gen.seen_pools[1].len(), 4);
        assert_eq!(bad.1, [2, 4]);
        assert_eq!(
            s.candidates,
            s.blank_or_duplicate + 3 + s.surplus + s.accepted
        );
    }

    #[test]
    fn excluded_prompts_are_never_accepted() {
        let mut gen = Scripted {
            rounds: vec![vec!["a cat", "a dog", "a cow"], vec!["a bird"]],
            seen_pools: vec![],
            wanted: vec![],
        };
        let exclude = vec!["a dog".to_string(), " a bird ".to_string()];
        let out = run_loop_excluding("s", &[], &exclude, &mut gen, &mut [], 3, 2, &mut |_, _| {})
            .unwrap();
        let texts: Vec<&str> = out.records.iter().map(|r| r.text.as_str()).collect();
        assert_eq!(texts, ["a cat", "a cow"]);
        assert_eq!(out.stats.blank_or_duplicate, 2);
        // Excluded prompts are not in the pool the generator sees.
        assert_eq!(gen.seen_pools[1], ["a cat", "a cow"]);
    }

    #[test]
    fn loop_reports_shortfall_after_max_rounds() {
        let mut gen = Scripted {
            rounds: vec![vec!["x"], vec!["x"], vec!["y"]],
            seen_pools: vec![],
            wanted: vec![],
        };
        let out = run_loop("s", &[], &mut gen, &mut [], 5, 2, &mut |_, _| {}).unwrap();
        assert!(!out.complete);
        assert_eq!(out.records.len(), 1);
        assert_eq!(out.stats.rounds, 2);
    }

    #[test]
    fn loop_stops_when_rounds_stop_adding_prompts() {
        let mut rounds = vec![vec!["a", "b"]];
        rounds.extend((0..30).map(|_| vec!["a"]));
        let mut gen = Scripted {
            rounds,
            seen_pools: vec![],
            wanted: vec![],
        };
        let out = run_loop("s", &[], &mut gen, &mut [], 5, 100, &mut |_, _| {}).unwrap();
        assert!(out.stats.stalled && !out.complete);
        assert_eq!(out.stats.rounds, 1 + STALL_ROUNDS);
        assert_eq!(out.records.len(), 2);
    }

    #[test]
    fn verdict_count_mismatch_is_an_error_naming_the_filter() {
        struct Short;
        impl CandidateFilter for Short {
            fn name(&self) -> &str {
                "short"
            }
            fn judge(&mut self, _: &[String], _: &[String]) -> Result<Vec<(bool, Option<String>)>> {
                Ok(vec![])
            }
        }
        let mut gen = Scripted {
            rounds: vec![vec!["x"]],
            seen_pools: vec![],
            wanted: vec![],
        };
        let err = run_loop("s", &[], &mut gen, &mut [&mut Short], 1, 1, &mut |_, _| {})
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"short\"") && err.contains("0 verdicts"),
            "{err}"
        );
    }

    #[test]
    fn wanted_hint_follows_the_acceptance_rate() {
        assert_eq!(wanted_hint(10, 0, 0), 10);
        assert_eq!(wanted_hint(10, 50, 100), 20);
        assert_eq!(wanted_hint(10, 1, 1000), 200); // 5% floor
        assert_eq!(wanted_hint(3, 0, 40), 60); // 20x cap
        assert_eq!(wanted_hint(1, 99, 100), 2);
        assert_eq!(wanted_hint(900, 1, 10), 1000); // absolute cap
        assert_eq!(wanted_hint(1500, 1, 10), 1500); // never below the remaining
    }

    #[test]
    fn jsonl_round_trip_and_no_temp_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/prompts.jsonl");
        let recs = vec![
            PromptRecord {
                text: "a \"quoted\" cat".into(),
                skill: "general".into(),
                generator: "template".into(),
                round: 0,
            },
            PromptRecord {
                text: "two dogs".into(),
                skill: "general".into(),
                generator: "template".into(),
                round: 3,
            },
        ];
        selma_io::write_jsonl(&path, &recs).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let back: Vec<PromptRecord> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(back, recs);
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }
}
