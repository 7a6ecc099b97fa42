//! `pipeline.toml`: the configuration of one `selma run` (serde, unknown keys
//! rejected), where each value came from (file and line, for errors), and the
//! embedded default (`examples/tiny.toml`).

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// The embedded default configuration (the README's main job).
pub const DEFAULT_CONFIG: &str = include_str!("../../../examples/tiny.toml");

/// The name shown for the embedded default in messages.
pub const DEFAULT_CONFIG_NAME: &str = "<embedded examples/tiny.toml>";

fn sp<T>(v: T) -> Spanned<T> {
    Spanned::new(0..0, v)
}

/// A whole `pipeline.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Run-wide settings.
    #[serde(default)]
    pub run: RunSection,
    /// Teacher and student models.
    pub models: ModelsSection,
    /// Optional OpenAI-compatible LLM endpoint.
    pub llm: Option<LlmSection>,
    /// Prompt-generation defaults for every skill.
    #[serde(default)]
    pub prompts: PromptsSection,
    /// The skills, in order.
    pub skills: Vec<SkillSection>,
    /// Image generation and image filters.
    #[serde(default)]
    pub images: ImagesSection,
    /// Expert (and joint) LoRA training.
    #[serde(default)]
    pub train: TrainSection,
    /// Merge strategies (default: one `linear`).
    #[serde(default = "default_merges")]
    pub merge: Vec<MergeSection>,
    /// Evaluation.
    #[serde(default)]
    pub eval: EvalSection,
    /// Plugin sandbox limits.
    #[serde(default)]
    pub limits: LimitsSection,
    /// Plugin parameters by plugin name: `[params.rouge-l] threshold = 0.8`.
    #[serde(default)]
    pub params: BTreeMap<String, toml::Table>,
}

/// `[run]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSection {
    /// Seed every other seed is derived from.
    pub seed: u64,
    /// Device: cpu or cuda:N.
    pub device: String,
    /// Model precision: f32, f16 or bf16.
    pub dtype: String,
    /// Train the joint baseline (one LoRA on all skills' data).
    pub joint: bool,
    /// Run directory (relative to the config file); `--run-dir` wins.
    pub dir: Option<Spanned<String>>,
    /// Report title.
    pub title: String,
    /// Repeat training, merges and evaluation noise once per seed (results:
    /// mean over seeds with a 95% Student-t interval). Absent: one run with `seed`.
    pub seeds: Option<Vec<u64>>,
}

impl Default for RunSection {
    fn default() -> Self {
        Self {
            seed: 0,
            device: "cpu".into(),
            dtype: "f32".into(),
            joint: true,
            dir: None,
            title: "SELMA run".into(),
            seeds: None,
        }
    }
}

/// `[models]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsSection {
    /// Diffusers folder that renders the training images.
    pub teacher: Spanned<String>,
    /// Diffusers folder the experts are trained on (default: the teacher).
    pub student: Option<Spanned<String>>,
    /// Create the tiny random model (`selma model init --preset tiny`) when a
    /// configured folder is missing.
    #[serde(default)]
    pub init_tiny: bool,
    /// Seed of that tiny model.
    #[serde(default)]
    pub init_seed: u64,
    /// Create this random model (`tiny` or `shapeworld`, as `selma model init
    /// --preset`) when a configured folder is missing; `init_tiny = true` means `tiny`.
    pub init_preset: Option<Spanned<String>>,
}

impl ModelsSection {
    /// The preset made on the fly for a missing folder, if any.
    pub fn preset(&self) -> Option<String> {
        match &self.init_preset {
            Some(p) => Some(p.get_ref().clone()),
            None if self.init_tiny => Some("tiny".into()),
            None => None,
        }
    }
}

/// `[llm]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmSection {
    /// Base URL, e.g. `http://localhost:8000/v1`.
    pub endpoint: String,
    /// Model name the server serves.
    pub model: String,
    /// Environment variable holding the API key.
    pub api_key_env: Option<String>,
    /// Use /chat/completions.
    #[serde(default)]
    pub chat: bool,
    /// Seconds per HTTP exchange.
    #[serde(default = "default_llm_timeout")]
    pub timeout_s: u64,
    /// Retries of a failed request.
    #[serde(default = "default_llm_retries")]
    pub retries: u32,
    /// Plugins (by name) granted the `llm` import besides each skill's generator.
    #[serde(default)]
    pub grants: Vec<String>,
}

fn default_llm_timeout() -> u64 {
    120
}
fn default_llm_retries() -> u32 {
    5
}

/// `[prompts]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PromptsSection {
    /// Generator plugin.
    pub generator: Spanned<String>,
    /// Prompt-filter plugins, in order.
    pub filters: Vec<Spanned<String>>,
    /// Prompts per skill.
    pub count: usize,
    /// Generator rounds before giving up.
    pub max_rounds: u32,
}

impl Default for PromptsSection {
    fn default() -> Self {
        Self {
            generator: sp("template".into()),
            filters: vec![sp("rouge-l".into()), sp("length".into())],
            count: 1000,
            max_rounds: 200,
        }
    }
}

/// One `[[skills]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkillSection {
    /// Bundled skill name or `.wasm` path.
    pub name: Spanned<String>,
    /// Prompts for this skill (default `prompts.count`).
    pub count: Option<usize>,
    /// Generator for this skill (default `prompts.generator`).
    pub generator: Option<Spanned<String>>,
    /// Prompt filters for this skill (default `prompts.filters`).
    pub filters: Option<Vec<Spanned<String>>>,
    /// A file of held-out evaluation prompts (one per line, or JSON lines with `text`).
    pub eval_prompts: Option<Spanned<String>>,
    /// Evaluation images per held-out prompt for this skill (default `eval.per_prompt`).
    pub eval_per_prompt: Option<usize>,
}

/// `[images]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImagesSection {
    /// Images rendered per prompt.
    pub per_prompt: usize,
    /// Denoising steps.
    pub steps: usize,
    /// Classifier-free guidance.
    pub guidance: f64,
    /// Sampler: ddim, euler, euler-a, dpm++2m.
    pub scheduler: Spanned<String>,
    /// DDIM eta.
    pub eta: f64,
    /// Width in pixels (default: the model's native size).
    pub width: Option<usize>,
    /// Height in pixels (default: the model's native size).
    pub height: Option<usize>,
    /// Negative prompt.
    pub negative: String,
    /// Image-filter plugins deciding which images train the experts.
    pub filters: Vec<Spanned<String>>,
    /// Also train every expert, the joint baseline and the merges on all
    /// images, unfiltered (variants `.../unfiltered`): the image-filter ablation.
    pub ablate_filters: bool,
}

impl Default for ImagesSection {
    fn default() -> Self {
        Self {
            per_prompt: 1,
            steps: 50,
            guidance: 7.5,
            scheduler: sp("ddim".into()),
            eta: 0.0,
            width: None,
            height: None,
            negative: String::new(),
            filters: vec![],
            ablate_filters: false,
        }
    }
}

/// `[train]` (SELMA's recipe by default).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// LoRA rank.
    pub rank: usize,
    /// LoRA alpha (scale = alpha / rank).
    pub alpha: f64,
    /// Adapted UNet modules.
    pub targets: Vec<String>,
    /// Optimizer updates per expert.
    pub steps: u64,
    /// Updates of the joint baseline (default: `steps`).
    pub joint_steps: Option<u64>,
    /// Images per micro-batch.
    pub batch: usize,
    /// Micro-batches per update.
    pub grad_accum: usize,
    /// Learning rate.
    pub lr: f64,
    /// constant, constant_with_warmup or cosine.
    pub lr_schedule: String,
    /// Warm-up updates.
    pub warmup_steps: u64,
    /// Training resolution in pixels.
    pub resolution: u32,
    /// Random horizontal flips.
    pub random_flip: bool,
    /// min-SNR-gamma loss weighting.
    pub min_snr_gamma: Option<f64>,
    /// Noise offset.
    pub noise_offset: f64,
    /// What the adapters minimise: "sft" (the diffusion loss on the kept
    /// images, SELMA's recipe) or "dpo" (Diffusion-DPO on pairs of draws of
    /// one prompt, the image filters' passed image over a failed one, with
    /// the frozen student as reference). Left out of the run's input hash
    /// when "sft".
    #[serde(skip_serializing_if = "is_sft")]
    pub objective: selma_train::config::Objective,
    /// Diffusion-DPO's beta (default: selma train's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dpo_beta: Option<f64>,
    /// Checkpoint every N updates (what a killed run loses at most).
    pub save_every: u64,
    /// Output layout: peft or kohya.
    pub format: String,
    /// Replay of pretraining-style data in every adapter's training set
    /// (`[train.replay]`; none by default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay: Option<ReplaySection>,
    /// Further selma-train settings by their TrainConfig name (e.g.
    /// `ema_decay`, `caption_dropout`, `max_grad_norm`), passed through.
    pub extra: toml::Table,
}

/// `[train.replay]`: a share of every expert's (and the joint adapter's)
/// training rows replays pretraining-style images, against forgetting what
/// the skill data does not show. The pool is an image folder (`data`) or
/// ShapeWorld scenes rendered for the run (`shapeworld` = how many).
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReplaySection {
    /// Share of the training rows that are replayed, in (0, 1): an adapter
    /// with K skill images gets round(K * share / (1 - share)) replay rows.
    pub share: f64,
    /// An image folder with metadata.jsonl (relative to the config file).
    pub data: Option<String>,
    /// Render this many ShapeWorld scenes as the pool instead.
    pub shapeworld: Option<usize>,
    /// ShapeWorld caption mix of the pool (`selma shapeworld render --mix`).
    #[serde(default = "default_replay_mix")]
    pub mix: String,
    /// ShapeWorld: probability that a 3-4 object count keeps its number word
    /// (world v1 only).
    #[serde(default = "default_number_word_keep")]
    pub number_word_keep: f64,
    /// ShapeWorld: the world whose pretraining captions the pool has, "v1"
    /// or "v2" (alt-text captions at world v2's rates). Replay the world
    /// the base was pretrained on. (Left out of the run's input hash when
    /// v1, so runs made before world v2 existed resume unchanged.)
    #[serde(default, skip_serializing_if = "selma_shapeworld::World::is_v1")]
    pub world: selma_shapeworld::World,
    /// Seed of the rendered pool.
    #[serde(default)]
    pub seed: u64,
}

fn default_replay_mix() -> String {
    "single=0.2,count=0.4,binding=0.2,spatial=0.2".into()
}

fn is_sft(o: &selma_train::config::Objective) -> bool {
    *o == selma_train::config::Objective::Sft
}

fn default_number_word_keep() -> f64 {
    0.1
}

impl Default for TrainSection {
    fn default() -> Self {
        let d = selma_train::trainer::TrainConfig::default();
        Self {
            rank: d.rank,
            alpha: d.alpha,
            targets: d.targets,
            steps: d.steps,
            joint_steps: None,
            batch: d.batch,
            grad_accum: d.grad_accum,
            lr: d.lr,
            lr_schedule: d.lr_schedule,
            warmup_steps: d.warmup_steps,
            resolution: d.resolution,
            random_flip: d.random_flip,
            min_snr_gamma: d.min_snr_gamma,
            noise_offset: d.noise_offset,
            objective: d.objective,
            dpo_beta: None,
            save_every: d.save_every,
            format: d.format,
            replay: None,
            extra: toml::Table::new(),
        }
    }
}

/// One `[[merge]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeSection {
    /// Merge-strategy plugin (bundled name or `.wasm` path).
    pub strategy: Spanned<String>,
    /// Label in file names and the report (default: the plugin's name).
    pub name: Option<String>,
    /// One weight per skill, in `[[skills]]` order (default 1/K).
    pub weights: Option<Vec<f32>>,
    /// Output rank (see `selma merge --help`).
    pub rank: Option<usize>,
    /// Strategy parameters.
    #[serde(default)]
    pub params: toml::Table,
}

fn default_merges() -> Vec<MergeSection> {
    vec![MergeSection {
        strategy: sp("linear".into()),
        name: None,
        weights: None,
        rank: None,
        params: toml::Table::new(),
    }]
}

/// `[eval]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Held-out prompts per skill (from the skill's generator, another seed).
    pub prompts: usize,
    /// Seed of the held-out prompts and of the evaluation images (default: derived from run.seed).
    pub seed: Option<u64>,
    /// Sampling steps (default `images.steps`).
    pub steps: Option<usize>,
    /// Guidance (default `images.guidance`).
    pub guidance: Option<f64>,
    /// Image-filter plugins used as scorers (their verdict's score).
    pub scorers: Vec<Spanned<String>>,
    /// A CLIP model folder for CLIPScore.
    pub clip_model: Option<Spanned<String>>,
    /// Prompts per skill shown as image grids in the report.
    pub grid_prompts: usize,
    /// Evaluation images per held-out prompt, each with its own fixed seed
    /// (for skills with few distinct prompts).
    pub per_prompt: usize,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            prompts: 100,
            seed: None,
            steps: None,
            guidance: None,
            scorers: vec![sp("degenerate".into())],
            clip_model: None,
            grid_prompts: 4,
            per_prompt: 1,
        }
    }
}

/// `[limits]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Linear memory per plugin instance, MiB.
    pub memory_mb: usize,
    /// Seconds per plugin call (merges: per layer).
    pub call_timeout_s: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            memory_mb: 256,
            call_timeout_s: 60,
        }
    }
}

/// A parsed config with its source, for `file:line` in errors.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The parsed config.
    pub cfg: PipelineConfig,
    /// The TOML text.
    pub text: String,
    /// Where it came from (a path or [`DEFAULT_CONFIG_NAME`]).
    pub origin: String,
    /// Folder relative paths are resolved against.
    pub base_dir: PathBuf,
}

/// 1-based line of byte offset `pos` in `text`.
pub fn line_of(text: &str, pos: usize) -> usize {
    text[..pos.min(text.len())].matches('\n').count() + 1
}

impl Loaded {
    /// Parse TOML text; errors name the origin, the line and the key.
    pub fn parse(text: &str, origin: &str, base_dir: &Path) -> Result<Self> {
        let cfg: PipelineConfig = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| format!(":{}", line_of(text, s.start)))
                .unwrap_or_default();
            anyhow::anyhow!("{origin}{line}: invalid pipeline config: {e}")
        })?;
        Ok(Self {
            cfg,
            text: text.to_string(),
            origin: origin.to_string(),
            base_dir: base_dir.to_path_buf(),
        })
    }

    /// Read and parse a file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading pipeline config {}", path.display()))?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Self::parse(&text, &path.display().to_string(), base)
    }

    /// The embedded default.
    pub fn embedded() -> Result<Self> {
        Self::parse(DEFAULT_CONFIG, DEFAULT_CONFIG_NAME, Path::new("."))
    }

    /// `origin:line` of a spanned value (`origin` alone for defaults).
    pub fn at<T>(&self, v: &Spanned<T>) -> String {
        let s = v.span();
        if s.start == 0 && s.end == 0 {
            format!("{} (default)", self.origin)
        } else {
            format!("{}:{}", self.origin, line_of(&self.text, s.start))
        }
    }

    /// `origin:line` of a table header such as `[params.rouge-l]` (origin alone if absent).
    pub fn at_header(&self, header: &str) -> String {
        let mut pos = None;
        for (i, line) in self.text.lines().enumerate() {
            let t = line.trim();
            if t.starts_with(header) {
                pos = Some(i + 1);
                break;
            }
        }
        match pos {
            Some(l) => format!("{}:{l}", self.origin),
            None => self.origin.clone(),
        }
    }

    /// Resolve a configured path: `$RUN/...` inside the run directory,
    /// relative paths against the config file's folder.
    pub fn resolve(&self, raw: &str, run_dir: &Path) -> PathBuf {
        if let Some(rest) = raw
            .strip_prefix("$RUN/")
            .or_else(|| raw.strip_prefix("$RUN\\"))
        {
            return run_dir.join(rest);
        }
        if raw == "$RUN" {
            return run_dir.to_path_buf();
        }
        let p = PathBuf::from(raw);
        if p.is_absolute() {
            p
        } else {
            self.base_dir.join(p)
        }
    }
}

/// The stages of a run, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    /// Prompts per skill.
    Prompts,
    /// Teacher images and image filters.
    Images,
    /// Experts and the joint baseline.
    Train,
    /// Merged LoRAs.
    Merge,
    /// Held-out prompts, images, scores, results.json.
    Eval,
    /// report.html.
    Report,
}

impl Stage {
    /// All stages in order.
    pub const ALL: [Stage; 6] = [
        Stage::Prompts,
        Stage::Images,
        Stage::Train,
        Stage::Merge,
        Stage::Eval,
        Stage::Report,
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Prompts => "prompts",
            Stage::Images => "images",
            Stage::Train => "train",
            Stage::Merge => "merge",
            Stage::Eval => "eval",
            Stage::Report => "report",
        }
    }
}

impl std::str::FromStr for Stage {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match Stage::ALL.iter().find(|st| st.name() == s.trim()) {
            Some(st) => Ok(*st),
            None => bail!("unknown stage {s:?}: use prompts, images, train, merge, eval or report"),
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_parses() {
        let l = Loaded::embedded().unwrap();
        assert_eq!(l.cfg.skills.len(), 5);
        assert!(l.cfg.models.init_tiny);
    }

    #[test]
    fn sd15_example_parses_with_selma_recipe() {
        let text = include_str!("../../../examples/sd15.toml");
        let l = Loaded::parse(text, "sd15.toml", Path::new(".")).unwrap();
        let t = &l.cfg.train;
        assert_eq!((t.rank, t.steps, t.batch, t.grad_accum), (128, 5000, 16, 4));
        assert_eq!(t.lr, 3e-4);
        assert_eq!(l.cfg.prompts.generator.get_ref(), "llm-fewshot");
        assert!(l.cfg.llm.is_some());
        assert_eq!(l.cfg.merge.len(), 2);
    }

    #[test]
    fn new_keys_default_to_the_old_behaviour() {
        let l = Loaded::embedded().unwrap();
        assert!(l.cfg.run.seeds.is_none());
        assert!(!l.cfg.images.ablate_filters);
        assert_eq!(l.cfg.eval.per_prompt, 1);
        assert_eq!(l.cfg.models.preset().as_deref(), Some("tiny"));
        let text = "[models]\nteacher = \"m\"\n[[skills]]\nname = \"x\"\n";
        let l = Loaded::parse(text, "p.toml", Path::new(".")).unwrap();
        assert_eq!(l.cfg.models.preset(), None);
        let text =
            "[models]\nteacher = \"m\"\ninit_preset = \"shapeworld\"\n[[skills]]\nname = \"x\"\n";
        let l = Loaded::parse(text, "p.toml", Path::new(".")).unwrap();
        assert_eq!(l.cfg.models.preset().as_deref(), Some("shapeworld"));
    }

    #[test]
    fn shapeworld_example_parses_with_the_ablation() {
        let text = include_str!("../../../examples/shapeworld-ablation.toml");
        let l = Loaded::parse(text, "shapeworld-ablation.toml", Path::new("examples")).unwrap();
        let c = &l.cfg;
        assert_eq!(c.run.seeds.as_deref(), Some(&[0u64, 1, 2][..]));
        assert!(c.images.ablate_filters);
        assert_eq!(c.images.filters[0].get_ref(), "shapeworld-verifier");
        assert_eq!(c.eval.scorers[0].get_ref(), "shapeworld-verifier");
        assert_eq!((c.images.steps, c.images.guidance), (15, 1.5));
        assert_eq!(c.images.scheduler.get_ref(), "ddim");
        let t = &c.train;
        assert_eq!(
            (t.rank, t.lr, t.resolution, t.random_flip),
            (16, 1e-4, 32, false)
        );
        assert!(t.extra.contains_key("ema_decay"));
        let skills: Vec<&str> = c.skills.iter().map(|s| s.name.get_ref().as_str()).collect();
        assert_eq!(
            skills,
            ["sw-single", "sw-counting", "sw-binding", "sw-spatial"]
        );
        let merges: Vec<&str> = c
            .merge
            .iter()
            .map(|m| m.strategy.get_ref().as_str())
            .collect();
        assert_eq!(merges, ["linear", "ties"]);
        assert!(c.eval.prompts >= 200);
        assert_ne!(
            c.eval.seed,
            Some(c.run.seed),
            "held-out prompts need their own seed"
        );
        // At least 200 held-out samples per skill where the grammar allows
        // `count` + held-out prompts (single 9, counting 45, binding 129 beyond the seeds).
        for (s, avail) in c.skills.iter().zip([9usize, 45, 129, 525]) {
            let held_out = (avail - s.count.unwrap()).min(c.eval.prompts);
            let per = s.eval_per_prompt.unwrap_or(c.eval.per_prompt);
            assert!(
                held_out * per >= 200,
                "{}: {held_out} x {per}",
                s.name.get_ref()
            );
        }
        assert_eq!(
            l.resolve(c.models.teacher.get_ref(), Path::new("/r")),
            PathBuf::from("examples/../models/shapeworld-base")
        );
    }

    /// The main job's config is the ablation's pipeline cut down: one seed,
    /// no unfiltered variants, the same skills, filter, merges and scorer.
    #[test]
    fn shapeworld_quick_example_is_the_ablation_cut_down() {
        let parse = |text: &str| {
            Loaded::parse(text, "x.toml", Path::new("examples"))
                .unwrap()
                .cfg
        };
        let quick = parse(include_str!("../../../examples/shapeworld.toml"));
        let full = parse(include_str!("../../../examples/shapeworld-ablation.toml"));
        assert_eq!(quick.run.seeds, None);
        assert!(!quick.images.ablate_filters);
        let names = |c: &PipelineConfig| -> Vec<String> {
            c.skills.iter().map(|s| s.name.get_ref().clone()).collect()
        };
        assert_eq!(names(&quick), names(&full));
        assert_eq!(quick.images.filters, full.images.filters);
        assert_eq!(quick.eval.scorers, full.eval.scorers);
        assert_eq!(quick.merge.len(), full.merge.len());
        assert_eq!(
            quick.models.teacher.get_ref(),
            full.models.teacher.get_ref()
        );
        // The same recipe, so the main job's numbers are one seed of the ablation's.
        let recipe = |c: &PipelineConfig| {
            let (i, t, e) = (&c.images, &c.train, &c.eval);
            let sampler = (i.per_prompt, i.steps, i.guidance, e.steps, e.guidance);
            (sampler, (t.rank, t.lr, t.steps, t.batch), t.extra.clone())
        };
        assert_eq!(recipe(&quick), recipe(&full));
        assert_eq!(quick.train.replay, full.train.replay);
        assert!(!quick.train.random_flip);
        assert_ne!(quick.eval.seed, Some(quick.run.seed));
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text =
            "[models]\nteacher = \"m\"\n\n[images]\nstepz = 3\n[[skills]]\nname = \"general\"\n";
        let e = Loaded::parse(text, "p.toml", Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(e.contains("p.toml:5") && e.contains("stepz"), "{e}");
    }

    #[test]
    fn wrong_type_names_key_and_line() {
        let text = "[models]\nteacher = \"m\"\n[[skills]]\nname = \"general\"\n[train]\nsteps = \"many\"\n";
        let e = Loaded::parse(text, "p.toml", Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(e.contains("p.toml:6") && e.contains("steps"), "{e}");
    }

    #[test]
    fn spans_give_lines_and_run_paths_resolve() {
        let text = "[models]\n\nteacher = \"$RUN/model\"\n[[skills]]\nname = \"x\"\n";
        let l = Loaded::parse(text, "p.toml", Path::new("/cfg")).unwrap();
        assert_eq!(l.at(&l.cfg.models.teacher), "p.toml:3");
        assert_eq!(l.at(&l.cfg.prompts.generator), "p.toml (default)");
        assert_eq!(
            l.resolve(l.cfg.models.teacher.get_ref(), Path::new("/r")),
            PathBuf::from("/r/model")
        );
        assert_eq!(l.resolve("m", Path::new("/r")), PathBuf::from("/cfg/m"));
        assert_eq!(l.cfg.merge.len(), 1);
    }
}
