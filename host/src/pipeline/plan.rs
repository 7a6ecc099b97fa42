//! A validated run, [`Plan`]: the resolved skills, merges, plugins and
//! models, the replicas (seeds and data settings) and the adapters to
//! train; [`validate`](super::validate::validate) makes one from a config.

use super::config::{Loaded, Stage};
use super::store::{RunDir, Shard};
use super::unit::{Tag, Unit};
use anyhow::{ensure, Result};
use selma_runtime::{Runtime, RuntimeConfig};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How `selma run` was invoked.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// The config file (None: the embedded default).
    pub config: Option<PathBuf>,
    /// `--run-dir`.
    pub run_dir: Option<PathBuf>,
    /// `--shard i/n`.
    pub shard: Option<Shard>,
    /// `--stages` (None: all).
    pub stages: Option<Vec<Stage>>,
    /// `--force` stages.
    pub force: Vec<Stage>,
    /// Show progress bars.
    pub progress: bool,
    /// `--no-wait`: leave units other workers are running instead of
    /// waiting for them.
    pub no_wait: bool,
}

/// One skill, resolved.
#[derive(Debug, Clone)]
pub struct SkillPlan {
    /// Plugin spec as configured.
    pub spec: String,
    /// The skill's id (folder name, variant names).
    pub id: String,
    /// Prompts wanted.
    pub count: usize,
    /// Generator spec.
    pub generator: String,
    /// Prompt-filter specs.
    pub filters: Vec<String>,
    /// Held-out prompts file.
    pub eval_file: Option<PathBuf>,
    /// Evaluation images per held-out prompt.
    pub eval_per_prompt: usize,
}

/// One merge, resolved.
#[derive(Debug, Clone)]
pub struct MergePlan {
    /// Strategy spec.
    pub spec: String,
    /// Label (file name, variant `merged:<name>`).
    pub name: String,
    /// One weight per skill (None: 1/K).
    pub weights: Option<Vec<f32>>,
    /// Output rank.
    pub rank: Option<usize>,
    /// Strategy parameters.
    pub params: toml::Table,
}

/// One repetition of training, merging and evaluation: a seed and a data
/// setting (filtered images, or all images for the filter ablation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replica {
    /// The seed its training, merge and evaluation-noise seeds derive from.
    pub seed: u64,
    /// Whether `[run] seeds` is set (names then carry `@seed<N>`).
    pub tagged: bool,
    /// Trained on every image, not only those the image filters kept.
    pub unfiltered: bool,
}

impl Replica {
    /// Suffix of unit and variant names: `/unfiltered`, then `@seed<N>`.
    pub fn suffix(&self) -> String {
        format!("{}{}", self.group_suffix(), self.seed_suffix())
    }
    /// `@seed<N>` when seeds are configured, else empty.
    pub fn seed_suffix(&self) -> String {
        if self.tagged {
            format!("@seed{}", self.seed)
        } else {
            String::new()
        }
    }
    /// Suffix of seed-aggregated variant names: `/unfiltered` or empty.
    pub fn group_suffix(&self) -> &'static str {
        if self.unfiltered {
            "/unfiltered"
        } else {
            ""
        }
    }
    /// Suffix in file names: `.unfiltered`, then `.seed<N>`.
    pub fn file_suffix(&self) -> String {
        let mut s = String::new();
        if self.unfiltered {
            s.push_str(".unfiltered");
        }
        if self.tagged {
            s.push_str(&format!(".seed{}", self.seed));
        }
        s
    }
}

/// One LoRA to train: an expert (a skill id) or `joint`, in one replica.
#[derive(Debug, Clone)]
pub struct TrainJob {
    /// Skill id or `joint`.
    pub name: String,
    /// Its replica.
    pub replica: Replica,
    /// File stem under `experts/`.
    pub file: String,
}

impl TrainJob {
    /// Its unit (`expert:<skill>[/unfiltered][@seed<N>]`, `joint...`).
    pub fn unit(&self) -> Unit {
        Unit::adapter(&self.name, Tag::of(&self.replica))
    }
}

/// A validated run.
pub struct Plan {
    /// The config and its source.
    pub loaded: Loaded,
    /// The invocation.
    pub opts: RunOptions,
    /// The run directory.
    pub dir: RunDir,
    /// Teacher model folder.
    pub teacher: PathBuf,
    /// Student model folder.
    pub student: PathBuf,
    /// Skills in order.
    pub skills: Vec<SkillPlan>,
    /// Merges in order.
    pub merges: Vec<MergePlan>,
    /// Image-filter specs (training data).
    pub image_filters: Vec<String>,
    /// Image-filter specs used as scorers.
    pub scorers: Vec<String>,
    /// CLIP folder for CLIPScore.
    pub clip_model: Option<PathBuf>,
    /// Plugin spec -> identity (bundled name@version or file hash), for input hashes.
    pub plugin_ids: HashMap<String, String>,
    /// Plugin spec -> plugin name (the key of `[params.NAME]`).
    pub plugin_names: HashMap<String, String>,
    /// The LLM endpoint, if configured.
    pub llm: Option<selma_llm::LlmConfig>,
}

impl Plan {
    /// The run seed.
    pub fn seed(&self) -> u64 {
        self.loaded.cfg.run.seed
    }
    /// Is this stage selected?
    pub fn wants(&self, s: Stage) -> bool {
        self.opts.stages.as_ref().is_none_or(|v| v.contains(&s))
    }
    /// Identity of a plugin spec for hashing.
    pub fn plugin_id(&self, spec: &str) -> String {
        self.plugin_ids
            .get(spec)
            .cloned()
            .unwrap_or_else(|| spec.to_string())
    }
    /// The `[params.NAME]` table of a plugin spec (empty if none).
    pub fn params_of(&self, spec: &str) -> toml::Table {
        self.plugin_names
            .get(spec)
            .and_then(|n| self.loaded.cfg.params.get(n))
            .cloned()
            .unwrap_or_default()
    }
    /// The params of a spec as JSON (for input hashes).
    pub fn params_json(&self, spec: &str) -> serde_json::Value {
        serde_json::to_value(self.params_of(spec)).unwrap_or_default()
    }
    /// `plugin.key=value` strings of a spec's params (for `prompts::PromptsJob`).
    pub fn params_strings(&self, spec: &str) -> Vec<String> {
        let name = self.plugin_names.get(spec).cloned().unwrap_or_default();
        self.params_of(spec)
            .iter()
            .map(|(k, v)| match v {
                toml::Value::String(s) => format!("{name}.{k}={s}"),
                o => format!("{name}.{k}={o}"),
            })
            .collect()
    }
    /// A plugin runtime with the configured limits.
    pub fn runtime(&self, seed: u64) -> Result<Runtime> {
        Runtime::new(self.runtime_config(seed))
    }
    /// The runtime settings with the configured limits.
    pub fn runtime_config(&self, seed: u64) -> RuntimeConfig {
        let l = &self.loaded.cfg.limits;
        RuntimeConfig {
            seed,
            memory_limit: l.memory_mb << 20,
            call_timeout: Duration::from_secs(l.call_timeout_s.max(1)),
            log_to_stderr: false,
            ..Default::default()
        }
    }
    /// Expert/variant names: every skill id, then `joint` if enabled.
    pub fn train_units(&self) -> Vec<String> {
        let mut v: Vec<String> = self.skills.iter().map(|s| s.id.clone()).collect();
        if self.loaded.cfg.run.joint {
            v.push("joint".into());
        }
        v
    }
    /// The seeds of the run: `[run] seeds` (tagged) or `run.seed` alone.
    pub fn seeds(&self) -> Vec<(u64, bool)> {
        match &self.loaded.cfg.run.seeds {
            Some(v) => v.iter().map(|&s| (s, true)).collect(),
            None => vec![(self.seed(), false)],
        }
    }
    /// Every replica: per seed, filtered, then unfiltered when ablating.
    pub fn replicas(&self) -> Vec<Replica> {
        let mut out = vec![];
        for (seed, tagged) in self.seeds() {
            out.push(Replica {
                seed,
                tagged,
                unfiltered: false,
            });
            if self.loaded.cfg.images.ablate_filters {
                out.push(Replica {
                    seed,
                    tagged,
                    unfiltered: true,
                });
            }
        }
        out
    }
    /// The seed a replica's own seeds derive from (the run seed when untagged).
    pub fn replica_seed(&self, r: &Replica) -> u64 {
        if r.tagged {
            r.seed
        } else {
            self.seed()
        }
    }
    /// Every LoRA to train, replica by replica.
    pub fn train_jobs(&self) -> Vec<TrainJob> {
        let mut out = vec![];
        for r in self.replicas() {
            for name in self.train_units() {
                out.push(TrainJob {
                    file: format!("{name}{}", r.file_suffix()),
                    name,
                    replica: r,
                });
            }
        }
        out
    }
    /// Image size: the configured one (None: the model's native size).
    pub fn image_size(&self) -> (Option<usize>, Option<usize>) {
        (self.loaded.cfg.images.width, self.loaded.cfg.images.height)
    }
}

/// Is `dir` a diffusers folder? An error says what is missing.
pub fn check_diffusers_folder(dir: &Path) -> Result<()> {
    ensure!(dir.is_dir(), "folder {} does not exist", dir.display());
    for f in [
        "model_index.json",
        "unet/config.json",
        "vae/config.json",
        "scheduler/scheduler_config.json",
    ] {
        ensure!(
            dir.join(f).is_file(),
            "{} is not a diffusers model folder: {f} is missing",
            dir.display()
        );
    }
    Ok(())
}

/// The plan's summary for `selma status`: units per stage.
pub fn plan_summary(plan: &Plan) -> BTreeMap<String, Vec<String>> {
    let mut units: Vec<Unit> = vec![];
    for s in &plan.skills {
        units.push(Unit::Prompts(s.id.clone()));
    }
    for s in &plan.skills {
        units.push(Unit::Images(s.id.clone()));
        units.push(Unit::Filter(s.id.clone()));
    }
    units.extend(plan.train_jobs().iter().map(TrainJob::unit));
    for r in plan.replicas() {
        for x in &plan.merges {
            units.push(Unit::Merged(x.name.clone(), Tag::of(&r)));
        }
    }
    units.push(Unit::Results);
    units.push(Unit::Report);
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for u in units {
        m.entry(u.stage().name().to_string())
            .or_default()
            .push(u.to_string());
    }
    m
}

/// TrainConfig keys the pipeline sets itself (or through `[train]`).
const TRAIN_KEYS_OWNED: &[&str] = &[
    "model",
    "data",
    "out",
    "run_dir",
    "seed",
    "device",
    "dtype",
    "rank",
    "alpha",
    "targets",
    "steps",
    "batch",
    "grad_accum",
    "lr",
    "lr_schedule",
    "warmup_steps",
    "resolution",
    "random_flip",
    "min_snr_gamma",
    "noise_offset",
    "save_every",
    "format",
    "keep_checkpoints",
    "full",
    "objective",
    "dpo_beta",
];

/// Overlay `[train.extra]` on a trainer config; unknown or pipeline-owned
/// keys and bad values are errors naming the key.
pub fn apply_train_extra(
    tc: selma_train::trainer::TrainConfig,
    extra: &toml::Table,
) -> Result<selma_train::trainer::TrainConfig> {
    if extra.is_empty() {
        return Ok(tc);
    }
    let mut v = serde_json::to_value(&tc)?;
    for (k, val) in extra {
        ensure!(
            !TRAIN_KEYS_OWNED.contains(&k.as_str()),
            "train.extra.{k}: set by the pipeline (use [train] or [run]), not in train.extra"
        );
        v[k] = serde_json::to_value(val)?;
    }
    serde_json::from_value(v).map_err(|e| anyhow::anyhow!("train.extra: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_names() {
        let r = Replica {
            seed: 2,
            tagged: true,
            unfiltered: true,
        };
        assert_eq!(r.suffix(), "/unfiltered@seed2");
        assert_eq!(r.file_suffix(), ".unfiltered.seed2");
        assert_eq!(r.group_suffix(), "/unfiltered");
        let plain = Replica {
            seed: 2,
            tagged: false,
            unfiltered: false,
        };
        assert_eq!(
            (plain.suffix(), plain.file_suffix()),
            (String::new(), String::new())
        );
    }
}
