//! Validation of a parsed `pipeline.toml` into a [`Plan`], before any work:
//! model folders exist and are diffusers folders (or will be created as the
//! tiny model), every plugin loads and is of the kind its place needs, every
//! parameter fits its plugin's schema, every value is in range. Errors name
//! the file, the line and the key.

use super::config::{Loaded, Stage};
use super::store::{hash_file, RunDir, Shard};
use anyhow::{bail, ensure, Context, Result};
use selma_runtime::{PluginKind, Runtime, RuntimeConfig};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

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
    /// Unit name (`expert:<skill>[/unfiltered][@seed<N>]`, `joint...`).
    pub unit: String,
    /// File stem under `experts/`.
    pub file: String,
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
                    unit: format!("{}{}", train_unit(&name), r.suffix()),
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

/// Validate the config; load every plugin once.
pub fn validate(loaded: Loaded, opts: RunOptions) -> Result<Plan> {
    let cfg = &loaded.cfg;
    let l = &loaded;
    // Run directory.
    let run_dir = match (&opts.run_dir, &cfg.run.dir) {
        (Some(d), _) => d.clone(),
        (None, Some(d)) => l.resolve(d.get_ref(), Path::new(".")),
        (None, None) => {
            let stem = opts
                .config
                .as_ref()
                .and_then(|p| p.file_stem())
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_else(|| "tiny".into());
            PathBuf::from("runs").join(stem)
        }
    };
    // Values.
    let range = |ok: bool, key: &str, what: &str| -> Result<()> {
        ensure!(
            ok,
            "{}: {key} {what}",
            l.at_header(&format!("[{}]", key.split('.').next().unwrap_or(key)))
        );
        Ok(())
    };
    selma_diffusion::pipeline::parse_dtype(&cfg.run.dtype)
        .with_context(|| format!("{}: run.dtype", l.at_header("[run]")))?;
    ensure!(
        cfg.run.device == "cpu" || cfg.run.device.starts_with("cuda"),
        "{}: run.device {:?}: use cpu or cuda:N",
        l.at_header("[run]"),
        cfg.run.device
    );
    ensure!(
        !cfg.skills.is_empty(),
        "{}: no [[skills]]: name at least one skill",
        l.origin
    );
    let im = &cfg.images;
    range(
        im.per_prompt >= 1,
        "images.per_prompt",
        "must be at least 1",
    )?;
    range(im.steps >= 1, "images.steps", "must be at least 1")?;
    range(
        im.guidance.is_finite(),
        "images.guidance",
        "must be a finite number",
    )?;
    range(im.eta >= 0.0, "images.eta", "must be >= 0")?;
    for (k, v) in [("images.width", im.width), ("images.height", im.height)] {
        if let Some(v) = v {
            range(
                v >= 8 && v.is_multiple_of(8),
                k,
                "must be a positive multiple of 8",
            )?;
        }
    }
    im.scheduler
        .get_ref()
        .parse::<selma_diffusion::scheduler::SchedulerKind>()
        .with_context(|| format!("{}: images.scheduler", l.at(&im.scheduler)))?;
    let t = &cfg.train;
    range(t.rank >= 1, "train.rank", "must be at least 1")?;
    range(t.alpha > 0.0, "train.alpha", "must be > 0")?;
    range(t.steps >= 1, "train.steps", "must be at least 1")?;
    range(t.batch >= 1, "train.batch", "must be at least 1")?;
    range(t.grad_accum >= 1, "train.grad_accum", "must be at least 1")?;
    range(
        t.lr > 0.0 && t.lr.is_finite(),
        "train.lr",
        "must be a positive number",
    )?;
    range(
        t.resolution >= 8 && t.resolution.is_multiple_of(8),
        "train.resolution",
        "must be a positive multiple of 8",
    )?;
    range(
        !t.targets.is_empty(),
        "train.targets",
        "must name at least one module",
    )?;
    range(
        matches!(
            t.lr_schedule.as_str(),
            "constant" | "constant_with_warmup" | "cosine"
        ),
        "train.lr_schedule",
        "must be constant, constant_with_warmup or cosine",
    )?;
    t.format
        .parse::<selma_lora::LoraFormat>()
        .with_context(|| format!("{}: train.format", l.at_header("[train]")))?;
    apply_train_extra(selma_train::trainer::TrainConfig::default(), &t.extra)
        .with_context(|| l.at_header("[train.extra]"))?;
    if let Some(r) = &t.replay {
        let at = l.at_header("[train.replay]");
        ensure!(
            r.share > 0.0 && r.share < 1.0,
            "{at}: train.replay.share {} must be in (0, 1)",
            r.share
        );
        match (&r.data, r.shapeworld) {
            (Some(d), None) => {
                let dir = l.resolve(d, &run_dir);
                ensure!(
                    dir.join("metadata.jsonl").is_file(),
                    "{at}: train.replay.data {}: no metadata.jsonl there (an image folder as `selma shapeworld render` writes)",
                    dir.display()
                );
            }
            (None, Some(n)) => {
                ensure!(n >= 1, "{at}: train.replay.shapeworld must be at least 1");
                selma_shapeworld::Mix::parse(&r.mix)
                    .with_context(|| format!("{at}: train.replay.mix"))?;
                ensure!(
                    (0.0..=1.0).contains(&r.number_word_keep),
                    "{at}: train.replay.number_word_keep must be in [0, 1]"
                );
            }
            _ => bail!(
                "{at}: [train.replay] needs exactly one of data = \"FOLDER\" or shapeworld = COUNT"
            ),
        }
    }
    range(cfg.eval.prompts >= 1, "eval.prompts", "must be at least 1")?;
    if let Some(s) = cfg.eval.steps {
        range(s >= 1, "eval.steps", "must be at least 1")?;
    }
    ensure!(!cfg.merge.is_empty(), "{}: [[merge]] is empty", l.origin);
    if let Some(p) = &cfg.models.init_preset {
        ensure!(
            matches!(p.get_ref().as_str(), "tiny" | "shapeworld"),
            "{}: models.init_preset = {:?}: use \"tiny\" or \"shapeworld\"",
            l.at(p),
            p.get_ref()
        );
    }
    if let Some(seeds) = &cfg.run.seeds {
        range(
            !seeds.is_empty(),
            "run.seeds",
            "must list at least one seed",
        )?;
        let mut u = seeds.clone();
        u.sort();
        u.dedup();
        range(
            u.len() == seeds.len(),
            "run.seeds",
            "lists a seed twice: give distinct seeds",
        )?;
    }
    range(
        !cfg.images.ablate_filters || !cfg.images.filters.is_empty(),
        "images.ablate_filters",
        "needs at least one image filter in images.filters (without one, filtered = unfiltered)",
    )?;

    // Models.
    let model_path = |v: &Spanned<String>, key: &str| -> Result<PathBuf> {
        let p = l.resolve(v.get_ref(), &run_dir);
        if !p.exists() && cfg.models.preset().is_some() {
            return Ok(p);
        }
        check_diffusers_folder(&p).with_context(|| {
            format!(
                "{}: models.{key} = {:?}{}",
                l.at(v),
                v.get_ref(),
                if p.exists() {
                    ""
                } else {
                    " (set models.init_tiny = true or models.init_preset = \"shapeworld\" to create a random model there)"
                }
            )
        })?;
        Ok(p)
    };
    let teacher = model_path(&cfg.models.teacher, "teacher")?;
    let student = match &cfg.models.student {
        Some(s) => model_path(s, "student")?,
        None => teacher.clone(),
    };

    // LLM.
    let llm = cfg.llm.as_ref().map(|s| {
        let mut c = selma_llm::LlmConfig::new(s.endpoint.clone(), s.model.clone());
        c.api_key_env = s.api_key_env.clone();
        c.chat = s.chat;
        c.timeout = Duration::from_secs(s.timeout_s.max(1));
        c.max_retries = s.retries;
        c
    });

    // Plugins.
    let runtime = Runtime::new(RuntimeConfig {
        log_to_stderr: false,
        ..Default::default()
    })?;
    let mut plugin_ids = HashMap::new();
    let mut plugin_names = HashMap::new();
    let mut check_plugin = |v: &Spanned<String>, key: &str, want: PluginKind| -> Result<String> {
        let spec = v.get_ref().clone();
        let is_path = spec.ends_with(".wasm") || spec.contains('/') || spec.contains('\\');
        let resolved = if is_path {
            l.resolve(&spec, &run_dir).to_string_lossy().to_string()
        } else {
            spec.clone()
        };
        let place = format!("{}: {key} = {spec:?}", l.at(v));
        if is_path {
            ensure!(
                Path::new(&resolved).is_file(),
                "{place}: plugin file {resolved} does not exist"
            );
        }
        let kind = runtime.kind_of(&resolved).with_context(|| place.clone())?;
        ensure!(
            kind == want,
            "{place}: this plugin is a {} plugin, but {key} needs a {} plugin",
            kind.as_str(),
            want.as_str()
        );
        let meta = runtime.inspect(&resolved).with_context(|| place.clone())?;
        let id = if is_path {
            format!("file:{}", hash_file(Path::new(&resolved))?)
        } else {
            format!(
                "bundled:{}@{}:{}",
                meta.name,
                meta.version,
                env!("CARGO_PKG_VERSION")
            )
        };
        plugin_ids.insert(resolved.clone(), id);
        plugin_names.insert(resolved.clone(), meta.name.clone());
        if let Some(table) = cfg.params.get(&meta.name) {
            selma_runtime::Params::from_toml(&meta, table).with_context(|| {
                format!(
                    "{}: [params.{}]",
                    l.at_header(&format!("[params.{}]", meta.name)),
                    meta.name
                )
            })?;
        }
        Ok(resolved)
    };

    let mut skills = vec![];
    for (i, s) in cfg.skills.iter().enumerate() {
        let spec = check_plugin(&s.name, &format!("skills[{i}].name"), PluginKind::Skill)?;
        let generator = check_plugin(
            s.generator.as_ref().unwrap_or(&cfg.prompts.generator),
            &format!("skills[{i}].generator"),
            PluginKind::PromptGenerator,
        )?;
        let mut filters = vec![];
        for (j, f) in s
            .filters
            .as_ref()
            .unwrap_or(&cfg.prompts.filters)
            .iter()
            .enumerate()
        {
            filters.push(check_plugin(
                f,
                &format!("skills[{i}].filters[{j}]"),
                PluginKind::PromptFilter,
            )?);
        }
        let mut sk = runtime
            .skill(&spec)
            .with_context(|| format!("{}: skills[{i}].name", l.at(&s.name)))?;
        let info = sk
            .info()
            .with_context(|| format!("{}: skills[{i}].name: reading the skill", l.at(&s.name)))?;
        ensure!(
            !info.id.is_empty()
                && info
                    .id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "{}: skill {:?} has an id unusable as a folder name",
            l.at(&s.name),
            info.id
        );
        ensure!(
            info.id != "joint" && info.id != "experts" && info.id != "merged" && info.id != "eval",
            "{}: skill id {:?} clashes with a run-directory folder",
            l.at(&s.name),
            info.id
        );
        if let Some(prev) = skills.iter().find(|p: &&SkillPlan| p.id == info.id) {
            bail!(
                "{}: skill {:?} is listed twice (also as {:?})",
                l.at(&s.name),
                info.id,
                prev.spec
            );
        }
        let count = s.count.unwrap_or(cfg.prompts.count);
        ensure!(
            count >= 1,
            "{}: skills[{i}].count must be at least 1",
            l.at(&s.name)
        );
        let eval_file = match &s.eval_prompts {
            Some(f) => {
                let p = l.resolve(f.get_ref(), &run_dir);
                ensure!(
                    p.is_file(),
                    "{}: skills[{i}].eval_prompts: file {} does not exist",
                    l.at(f),
                    p.display()
                );
                Some(p)
            }
            None => None,
        };
        let eval_per_prompt = s.eval_per_prompt.unwrap_or(cfg.eval.per_prompt);
        ensure!(
            eval_per_prompt >= 1,
            "{}: skills[{i}].eval_per_prompt (or eval.per_prompt) must be at least 1",
            l.at(&s.name)
        );
        skills.push(SkillPlan {
            spec,
            id: info.id,
            count,
            generator,
            filters,
            eval_file,
            eval_per_prompt,
        });
    }
    let mut image_filters = vec![];
    for (j, f) in cfg.images.filters.iter().enumerate() {
        image_filters.push(check_plugin(
            f,
            &format!("images.filters[{j}]"),
            PluginKind::ImageFilter,
        )?);
    }
    let mut scorers = vec![];
    for (j, f) in cfg.eval.scorers.iter().enumerate() {
        scorers.push(check_plugin(
            f,
            &format!("eval.scorers[{j}]"),
            PluginKind::ImageFilter,
        )?);
    }
    let mut merges: Vec<MergePlan> = vec![];
    for (i, m) in cfg.merge.iter().enumerate() {
        let key = format!("merge[{i}].strategy");
        let spec = check_plugin(&m.strategy, &key, PluginKind::MergeStrategy)?;
        let plugin = runtime.merge_strategy(&spec)?;
        plugin
            .params_toml(&m.params)
            .with_context(|| format!("{}: merge[{i}].params", l.at(&m.strategy)))?;
        let name = m.name.clone().unwrap_or_else(|| plugin.name().to_string());
        ensure!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
            "{}: merge[{i}].name {name:?}: use letters, digits, - _ .",
            l.at(&m.strategy)
        );
        ensure!(
            merges.iter().all(|p| p.name != name),
            "{}: two [[merge]] entries are named {name:?}: give one a `name`",
            l.at(&m.strategy)
        );
        if let Some(w) = &m.weights {
            ensure!(
                w.len() == skills.len() && w.iter().all(|x| x.is_finite()),
                "{}: merge[{i}].weights has {} values for {} skills: give one finite weight per skill",
                l.at(&m.strategy),
                w.len(),
                skills.len()
            );
        }
        if let Some(r) = m.rank {
            ensure!(
                r >= 1,
                "{}: merge[{i}].rank must be at least 1",
                l.at(&m.strategy)
            );
        }
        merges.push(MergePlan {
            spec,
            name,
            weights: m.weights.clone(),
            rank: m.rank,
            params: m.params.clone(),
        });
    }
    let names: Vec<String> = plugin_names.values().cloned().collect();
    for name in cfg.params.keys() {
        ensure!(
            names.contains(name),
            "{}: [params.{name}]: no plugin of this run is named {name:?} (plugins: {})",
            l.at_header(&format!("[params.{name}]")),
            {
                let mut n = names.clone();
                n.sort();
                n.dedup();
                n.join(", ")
            }
        );
    }
    let clip_model = match &cfg.eval.clip_model {
        Some(v) => {
            let p = l.resolve(v.get_ref(), &run_dir);
            ensure!(
                p.join("config.json").is_file(),
                "{}: eval.clip_model: {} is not a CLIP model folder (config.json missing)",
                l.at(v),
                p.display()
            );
            Some(p)
        }
        None => None,
    };
    let mut plan = Plan {
        dir: RunDir::new(&run_dir),
        loaded,
        opts,
        teacher,
        student,
        skills,
        merges,
        image_filters,
        scorers,
        clip_model,
        plugin_ids,
        plugin_names,
        llm,
    };
    plan.opts.force.sort();
    Ok(plan)
}

/// The plan's summary for `selma status`: units per stage.
pub fn plan_summary(plan: &Plan) -> BTreeMap<String, Vec<String>> {
    let mut m = BTreeMap::new();
    let ids: Vec<String> = plan.skills.iter().map(|s| s.id.clone()).collect();
    m.insert(
        "prompts".into(),
        ids.iter().map(|s| format!("prompts:{s}")).collect(),
    );
    let mut images = vec![];
    for s in &ids {
        images.push(format!("images:{s}"));
        images.push(format!("filter:{s}"));
    }
    m.insert("images".into(), images);
    m.insert(
        "train".into(),
        plan.train_jobs().into_iter().map(|j| j.unit).collect(),
    );
    let mut merged = vec![];
    for r in plan.replicas() {
        for x in &plan.merges {
            merged.push(format!("merged:{}{}", x.name, r.suffix()));
        }
    }
    m.insert("merge".into(), merged);
    m.insert("eval".into(), vec!["results".into()]);
    m.insert("report".into(), vec!["report".into()]);
    m
}

/// The train-stage unit of an expert name (`joint` or a skill id).
pub fn train_unit(name: &str) -> String {
    if name == "joint" {
        "joint".into()
    } else {
        format!("expert:{name}")
    }
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
