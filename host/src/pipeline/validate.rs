//! Validation of a parsed `pipeline.toml` into a [`Plan`], before any work,
//! one function per config section: values in range (`[run]`, `[images]`,
//! `[train]` and `[train.replay]`, `[eval]`, `[models]`), model folders that
//! exist and are diffusers folders (or will be created as a random model),
//! every plugin loaded once and of the kind its place needs (`[[skills]]`,
//! image filters, scorers, `[[merge]]`), every `[params.NAME]` fitting its
//! plugin's schema. Errors name the file, the line and the key.

use super::config::Loaded;
use super::plan::{
    apply_train_extra, check_diffusers_folder, MergePlan, Plan, RunOptions, SkillPlan,
};
use super::store::{hash_file, RunDir};
use anyhow::{bail, ensure, Context, Result};
use selma_runtime::{PluginKind, Runtime, RuntimeConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

/// Validate the config; load every plugin once.
pub fn validate(loaded: Loaded, opts: RunOptions) -> Result<Plan> {
    let run_dir = run_dir(&loaded, &opts);
    let l = &loaded;
    run_section(l)?;
    images_section(l)?;
    train_section(l, &run_dir)?;
    eval_section(l)?;
    models_section(l)?;
    let (teacher, student) = model_folders(l, &run_dir)?;
    let llm = llm_section(l);
    let mut plugins = Plugins::new(l, &run_dir)?;
    let skills = skills_section(l, &mut plugins, &run_dir)?;
    let mut image_filters = vec![];
    for (j, f) in l.cfg.images.filters.iter().enumerate() {
        image_filters.push(plugins.check(
            f,
            &format!("images.filters[{j}]"),
            PluginKind::ImageFilter,
        )?);
    }
    let mut scorers = vec![];
    for (j, f) in l.cfg.eval.scorers.iter().enumerate() {
        scorers.push(plugins.check(f, &format!("eval.scorers[{j}]"), PluginKind::ImageFilter)?);
    }
    let merges = merge_section(l, &mut plugins, skills.len())?;
    params_section(l, &plugins)?;
    let clip_model = clip_model(l, &run_dir)?;
    let Plugins { ids, names, .. } = plugins;
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
        plugin_ids: ids,
        plugin_names: names,
        llm,
    };
    plan.opts.force.sort();
    Ok(plan)
}

/// The run directory: `--run-dir`, `[run] dir`, or `runs/<config stem>`.
fn run_dir(l: &Loaded, opts: &RunOptions) -> PathBuf {
    let cfg = &l.cfg;
    match (&opts.run_dir, &cfg.run.dir) {
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
    }
}

/// An error naming the section header of `key` unless `ok`.
fn range(l: &Loaded, ok: bool, key: &str, what: &str) -> Result<()> {
    ensure!(
        ok,
        "{}: {key} {what}",
        l.at_header(&format!("[{}]", key.split('.').next().unwrap_or(key)))
    );
    Ok(())
}

/// `[run]`: dtype, device, seeds; at least one `[[skills]]`.
fn run_section(l: &Loaded) -> Result<()> {
    let cfg = &l.cfg;
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
    if let Some(seeds) = &cfg.run.seeds {
        range(
            l,
            !seeds.is_empty(),
            "run.seeds",
            "must list at least one seed",
        )?;
        let mut u = seeds.clone();
        u.sort();
        u.dedup();
        range(
            l,
            u.len() == seeds.len(),
            "run.seeds",
            "lists a seed twice: give distinct seeds",
        )?;
    }
    Ok(())
}

/// `[images]`: counts, sizes, scheduler, the filter ablation.
fn images_section(l: &Loaded) -> Result<()> {
    let cfg = &l.cfg;
    let im = &cfg.images;
    range(
        l,
        im.per_prompt >= 1,
        "images.per_prompt",
        "must be at least 1",
    )?;
    range(l, im.steps >= 1, "images.steps", "must be at least 1")?;
    range(
        l,
        im.guidance.is_finite(),
        "images.guidance",
        "must be a finite number",
    )?;
    range(l, im.eta >= 0.0, "images.eta", "must be >= 0")?;
    for (k, v) in [("images.width", im.width), ("images.height", im.height)] {
        if let Some(v) = v {
            range(
                l,
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
    range(
        l,
        !cfg.images.ablate_filters || !cfg.images.filters.is_empty(),
        "images.ablate_filters",
        "needs at least one image filter in images.filters (without one, filtered = unfiltered)",
    )?;
    Ok(())
}

/// `[train]`, `[train.extra]` and `[train.replay]`.
fn train_section(l: &Loaded, run_dir: &Path) -> Result<()> {
    let cfg = &l.cfg;
    let t = &cfg.train;
    range(l, t.rank >= 1, "train.rank", "must be at least 1")?;
    range(l, t.alpha > 0.0, "train.alpha", "must be > 0")?;
    range(l, t.steps >= 1, "train.steps", "must be at least 1")?;
    range(l, t.batch >= 1, "train.batch", "must be at least 1")?;
    range(
        l,
        t.grad_accum >= 1,
        "train.grad_accum",
        "must be at least 1",
    )?;
    range(
        l,
        t.lr > 0.0 && t.lr.is_finite(),
        "train.lr",
        "must be a positive number",
    )?;
    range(
        l,
        t.resolution >= 8 && t.resolution.is_multiple_of(8),
        "train.resolution",
        "must be a positive multiple of 8",
    )?;
    range(
        l,
        !t.targets.is_empty(),
        "train.targets",
        "must name at least one module",
    )?;
    range(
        l,
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
    if t.objective == selma_train::config::Objective::Dpo {
        let at = l.at_header("[train]");
        ensure!(
            t.replay.is_none(),
            "{at}: train.objective = \"dpo\" trains on preference pairs only: remove [train.replay] (it mixes image-caption rows)"
        );
        ensure!(
            !cfg.images.ablate_filters,
            "{at}: train.objective = \"dpo\" takes its pairs from the image filters' verdicts: set images.ablate_filters = false"
        );
        ensure!(
            cfg.images.per_prompt >= 2,
            "{at}: train.objective = \"dpo\" pairs draws of one prompt: images.per_prompt must be at least 2"
        );
        if let Some(b) = t.dpo_beta {
            range(
                l,
                b > 0.0 && b.is_finite(),
                "train.dpo_beta",
                "must be a positive number",
            )?;
        }
    } else {
        range(
            l,
            t.dpo_beta.is_none(),
            "train.dpo_beta",
            "only applies with objective = \"dpo\"",
        )?;
    }
    if let Some(r) = &t.replay {
        let at = l.at_header("[train.replay]");
        ensure!(
            r.share > 0.0 && r.share < 1.0,
            "{at}: train.replay.share {} must be in (0, 1)",
            r.share
        );
        match (&r.data, r.shapeworld) {
            (Some(d), None) => {
                let dir = l.resolve(d, run_dir);
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
    Ok(())
}

/// `[eval]` counts and `[[merge]]` present.
fn eval_section(l: &Loaded) -> Result<()> {
    let cfg = &l.cfg;
    range(
        l,
        cfg.eval.prompts >= 1,
        "eval.prompts",
        "must be at least 1",
    )?;
    if let Some(s) = cfg.eval.steps {
        range(l, s >= 1, "eval.steps", "must be at least 1")?;
    }
    ensure!(!cfg.merge.is_empty(), "{}: [[merge]] is empty", l.origin);
    Ok(())
}

/// `[models]` settings.
fn models_section(l: &Loaded) -> Result<()> {
    let cfg = &l.cfg;
    if let Some(p) = &cfg.models.init_preset {
        ensure!(
            matches!(p.get_ref().as_str(), "tiny" | "shapeworld"),
            "{}: models.init_preset = {:?}: use \"tiny\" or \"shapeworld\"",
            l.at(p),
            p.get_ref()
        );
    }
    Ok(())
}

/// The teacher and student folders (the student defaults to the teacher).
fn model_folders(l: &Loaded, run_dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let cfg = &l.cfg;
    let model_path = |v: &Spanned<String>, key: &str| -> Result<PathBuf> {
        let p = l.resolve(v.get_ref(), run_dir);
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

    Ok((teacher, student))
}

/// `[llm]`, as the client's settings.
fn llm_section(l: &Loaded) -> Option<selma_llm::LlmConfig> {
    let cfg = &l.cfg;
    cfg.llm.as_ref().map(|s| {
        let mut c = selma_llm::LlmConfig::new(s.endpoint.clone(), s.model.clone());
        c.api_key_env = s.api_key_env.clone();
        c.chat = s.chat;
        c.timeout = Duration::from_secs(s.timeout_s.max(1));
        c.max_retries = s.retries;
        c
    })
}

/// Every plugin of the run, loaded once: identities and names by spec.
struct Plugins<'a> {
    l: &'a Loaded,
    run_dir: PathBuf,
    runtime: Runtime,
    /// Spec -> identity (bundled name@version or file hash), for input hashes.
    ids: HashMap<String, String>,
    /// Spec -> plugin name (the key of `[params.NAME]`).
    names: HashMap<String, String>,
}

impl<'a> Plugins<'a> {
    fn new(l: &'a Loaded, run_dir: &Path) -> Result<Self> {
        Ok(Self {
            l,
            run_dir: run_dir.to_path_buf(),
            runtime: Runtime::new(RuntimeConfig {
                log_to_stderr: false,
                ..Default::default()
            })?,
            ids: HashMap::new(),
            names: HashMap::new(),
        })
    }

    /// Resolves a plugin spec at config key `key`, checks that it loads and
    /// is a `want` plugin and that its `[params.NAME]` fit its schema.
    fn check(&mut self, v: &Spanned<String>, key: &str, want: PluginKind) -> Result<String> {
        let (l, cfg) = (self.l, &self.l.cfg);
        let spec = v.get_ref().clone();
        let is_path = spec.ends_with(".wasm") || spec.contains('/') || spec.contains('\\');
        let resolved = if is_path {
            l.resolve(&spec, &self.run_dir)
                .to_string_lossy()
                .to_string()
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
        let kind = self
            .runtime
            .kind_of(&resolved)
            .with_context(|| place.clone())?;
        ensure!(
            kind == want,
            "{place}: this plugin is a {} plugin, but {key} needs a {} plugin",
            kind.as_str(),
            want.as_str()
        );
        let meta = self
            .runtime
            .inspect(&resolved)
            .with_context(|| place.clone())?;
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
        self.ids.insert(resolved.clone(), id);
        self.names.insert(resolved.clone(), meta.name.clone());
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
    }
}

/// `[[skills]]`: each skill's plugins, id, counts and held-out prompts.
fn skills_section(l: &Loaded, plugins: &mut Plugins, run_dir: &Path) -> Result<Vec<SkillPlan>> {
    let cfg = &l.cfg;
    let mut skills = vec![];
    for (i, s) in cfg.skills.iter().enumerate() {
        let spec = plugins.check(&s.name, &format!("skills[{i}].name"), PluginKind::Skill)?;
        let generator = plugins.check(
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
            filters.push(plugins.check(
                f,
                &format!("skills[{i}].filters[{j}]"),
                PluginKind::PromptFilter,
            )?);
        }
        let mut sk = plugins
            .runtime
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
                let p = l.resolve(f.get_ref(), run_dir);
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
    Ok(skills)
}

/// `[[merge]]`: strategies, names, weights and ranks.
fn merge_section(l: &Loaded, plugins: &mut Plugins, n_skills: usize) -> Result<Vec<MergePlan>> {
    let cfg = &l.cfg;
    let mut merges: Vec<MergePlan> = vec![];
    for (i, m) in cfg.merge.iter().enumerate() {
        let key = format!("merge[{i}].strategy");
        let spec = plugins.check(&m.strategy, &key, PluginKind::MergeStrategy)?;
        let plugin = plugins.runtime.merge_strategy(&spec)?;
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
                w.len() == n_skills && w.iter().all(|x| x.is_finite()),
                "{}: merge[{i}].weights has {} values for {} skills: give one finite weight per skill",
                l.at(&m.strategy),
                w.len(),
                n_skills
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
    Ok(merges)
}

/// Every `[params.NAME]` names a plugin of this run.
fn params_section(l: &Loaded, plugins: &Plugins) -> Result<()> {
    let cfg = &l.cfg;
    let names: Vec<String> = plugins.names.values().cloned().collect();
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
    Ok(())
}

/// `eval.clip_model`: a CLIP folder for CLIPScore.
fn clip_model(l: &Loaded, run_dir: &Path) -> Result<Option<PathBuf>> {
    let cfg = &l.cfg;
    Ok(match &cfg.eval.clip_model {
        Some(v) => {
            let p = l.resolve(v.get_ref(), run_dir);
            ensure!(
                p.join("config.json").is_file(),
                "{}: eval.clip_model: {} is not a CLIP model folder (config.json missing)",
                l.at(v),
                p.display()
            );
            Some(p)
        }
        None => None,
    })
}
