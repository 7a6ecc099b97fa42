//! `selma shapeworld eval`: every variant (the base model, and the base with
//! each LoRA) renders the same seeded held-out prompts from the same noise,
//! the ShapeWorld verifier judges each image, and the report gives pass
//! rates per variant x skill (Wilson 95% intervals), count accuracy per
//! number of objects, and each LoRA's paired change against the base.

use super::paired::{paired_diff, PairedDiff};
use super::render::{Renderer, SampleSettings};
use crate::eval::stats::mean_ci95;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device};
use selma_diffusion::pipeline::StableDiffusion;
use selma_rng::SplitMix64;
use selma_runtime::{Runtime, RuntimeConfig};
use selma_shapeworld::{sample_caption, scene_seed, Caption, Form};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The skills evaluated by default, in display order.
pub const DEFAULT_SKILLS: [Form; 4] = [Form::Single, Form::Count, Form::Binding, Form::Spatial];

/// The label of the pooled row over all evaluated skills.
pub const ALL: &str = "all";

/// Parse a comma-separated skill list ("single,count,binding,spatial";
/// "counting" and an `sw-` prefix are accepted).
pub fn parse_skills(text: &str) -> Result<Vec<Form>> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let name = part.strip_prefix("sw-").unwrap_or(part);
        let form = Form::from_name(name).with_context(|| format!("--skills {text:?}"))?;
        ensure!(!out.contains(&form), "--skills {text:?}: {part} twice");
        out.push(form);
    }
    ensure!(
        !out.is_empty(),
        "--skills {text:?}: name at least one skill"
    );
    Ok(out)
}

/// The held-out prompts of one skill: `n` captions drawn with a generator
/// seeded `seed`, the same list `selma shapeworld prompts --skill F --count
/// N --seed S` prints.
pub fn eval_prompts(form: Form, n: usize, seed: u64) -> Vec<Caption> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| sample_caption(form, &mut rng)).collect()
}

/// The noise seed of prompt `index` of skill `form` under evaluation noise
/// seed `noise_seed` (independent of which other skills are evaluated).
pub fn image_seed(noise_seed: u64, form: Form, index: usize) -> u64 {
    let f = Form::ALL.iter().position(|x| *x == form).unwrap_or(0) as u64;
    scene_seed(noise_seed, (f << 32) | index as u64)
}

/// One model variant: the base (`lora: None`) or the base plus a LoRA.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Variant {
    /// Display name ("base" for the base model).
    pub name: String,
    /// The LoRA file (weight 1).
    pub lora: Option<PathBuf>,
}

/// Everything an evaluation depends on.
#[derive(Debug, Clone)]
pub struct EvalConfig {
    /// Diffusers model folder.
    pub model: PathBuf,
    /// Variants; the first must be the base (no LoRA).
    pub variants: Vec<Variant>,
    /// Skills (caption forms) to evaluate.
    pub skills: Vec<Form>,
    /// Prompts drawn per skill.
    pub prompts_per_skill: usize,
    /// Seed of the prompt draw.
    pub prompt_seed: u64,
    /// Every prompt is rendered once per noise seed.
    pub noise_seeds: Vec<u64>,
    /// Sampler settings.
    pub sample: SampleSettings,
    /// Images rendered per batch.
    pub batch: usize,
    /// Write every image as a PNG under this folder.
    pub images: Option<PathBuf>,
    /// Device of the model.
    pub device: Device,
    /// Bootstrap resamples of the paired difference.
    pub bootstrap_resamples: usize,
    /// Seed of the bootstrap.
    pub bootstrap_seed: u64,
    /// Image-filter plugin that judges the images.
    pub verifier: String,
}

/// One rendered sample: a prompt under one noise seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Skill (caption form) name.
    pub skill: String,
    /// Index of the prompt in its skill's list.
    pub index: usize,
    /// The prompt.
    pub prompt: String,
    /// The evaluation noise seed.
    pub noise_seed: u64,
    /// The image's own seed (`selma generate --seed` reproduces it).
    pub seed: u64,
    /// Number of objects the caption asks for (count: n; single: 1; binding/spatial: 2).
    pub objects: usize,
}

/// A variant's verdicts, aligned with `EvalReport::samples`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VariantResult {
    /// Display name.
    pub name: String,
    /// LoRA file, if any.
    pub lora: Option<PathBuf>,
    /// Verifier pass per sample.
    pub pass: Vec<bool>,
    /// Verifier score per sample.
    pub score: Vec<f32>,
    /// Seconds spent rendering and judging.
    pub seconds: f64,
}

/// Pass rate of one variant on one skill (or `all`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rate {
    /// Variant name.
    pub variant: String,
    /// Skill name or `all`.
    pub skill: String,
    /// Samples (prompts x noise seeds).
    pub n: usize,
    /// Samples the verifier passed.
    pub passed: usize,
    /// Pass rate.
    pub mean: f64,
    /// Wilson 95% interval, lower end.
    pub lo: f64,
    /// Upper end.
    pub hi: f64,
    /// Mean verifier score (partial credit).
    pub mean_score: f64,
}

/// Count accuracy of one variant for prompts asking for `objects` objects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    /// Variant name.
    pub variant: String,
    /// The number the caption asks for.
    pub objects: usize,
    /// Samples.
    pub n: usize,
    /// Passed.
    pub passed: usize,
    /// Pass rate.
    pub mean: f64,
    /// Wilson 95% interval.
    pub lo: f64,
    /// Upper end.
    pub hi: f64,
}

/// A LoRA variant's paired change against the base on one skill (or `all`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Paired {
    /// Variant name.
    pub variant: String,
    /// Skill name or `all`.
    pub skill: String,
    /// The difference, its interval and the McNemar test.
    #[serde(flatten)]
    pub diff: PairedDiff,
}

/// The settings an evaluation ran with (stored in the JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// Model folder.
    pub model: PathBuf,
    /// Skills in display order.
    pub skills: Vec<String>,
    /// Prompts per skill.
    pub prompts_per_skill: usize,
    /// Seed of the prompt draw.
    pub prompt_seed: u64,
    /// Noise seeds.
    pub noise_seeds: Vec<u64>,
    /// Denoising steps.
    pub steps: usize,
    /// Guidance scale.
    pub guidance: f64,
    /// Sampler name.
    pub scheduler: String,
    /// DDIM eta.
    pub eta: f64,
    /// Verifier plugin.
    pub verifier: String,
    /// Bootstrap resamples.
    pub bootstrap_resamples: usize,
    /// Bootstrap seed.
    pub bootstrap_seed: u64,
}

/// The whole result (`--out results.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// How it ran.
    pub settings: Settings,
    /// Pass rates per variant x skill, then `all`.
    pub accuracy: Vec<Rate>,
    /// Count accuracy per number of objects (count skill only).
    pub count_by_n: Vec<Bucket>,
    /// Each LoRA variant against the base.
    pub paired: Vec<Paired>,
    /// The samples, in rendering order.
    pub samples: Vec<Sample>,
    /// Verdicts per variant.
    pub variants: Vec<VariantResult>,
}

/// The samples of an evaluation: skill by skill, prompt by prompt, one per
/// noise seed.
pub fn build_samples(
    skills: &[Form],
    prompts_per_skill: usize,
    prompt_seed: u64,
    noise_seeds: &[u64],
) -> Vec<Sample> {
    let mut out = Vec::new();
    for &form in skills {
        for (index, cap) in eval_prompts(form, prompts_per_skill, prompt_seed)
            .into_iter()
            .enumerate()
        {
            let objects = match cap {
                Caption::Count { n, .. } => n as usize,
                Caption::Single { .. } => 1,
                Caption::Plural { .. } => 2,
                Caption::Binding { .. } | Caption::Spatial { .. } => 2,
            };
            for &ns in noise_seeds {
                out.push(Sample {
                    skill: form.name().to_string(),
                    index,
                    prompt: cap.text(),
                    noise_seed: ns,
                    seed: image_seed(ns, form, index),
                    objects,
                });
            }
        }
    }
    out
}

/// File-system-safe form of a variant name.
fn safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Load the model with a variant's LoRA merged in.
fn load_variant(cfg: &EvalConfig, v: &Variant) -> Result<Renderer> {
    let mut sd = StableDiffusion::load(&cfg.model, &cfg.device, DType::F32)
        .with_context(|| format!("loading model folder {}", cfg.model.display()))?;
    if let Some(path) = &v.lora {
        let file = selma_lora::LoraFile::load(path, &cfg.device)
            .with_context(|| format!("reading LoRA {} (variant {})", path.display(), v.name))?;
        sd.attach_lora(&file, 1.0)
            .with_context(|| format!("applying LoRA {} (variant {})", path.display(), v.name))?;
        sd.merge_adapters()?;
    }
    Renderer::new(sd)
}

/// Run the evaluation; `progress(done, total)` after every batch.
pub fn run(cfg: &EvalConfig, progress: &mut dyn FnMut(usize, usize)) -> Result<EvalReport> {
    ensure!(
        cfg.variants.first().is_some_and(|v| v.lora.is_none()),
        "the first variant must be the base model (no LoRA)"
    );
    let mut names = std::collections::BTreeSet::new();
    for v in &cfg.variants {
        ensure!(
            names.insert(v.name.as_str()),
            "two variants are called {:?}: give each --lora a different NAME",
            v.name
        );
        if let Some(p) = &v.lora {
            ensure!(
                p.is_file(),
                "LoRA file {} (variant {}) does not exist",
                p.display(),
                v.name
            );
        }
    }
    ensure!(
        cfg.prompts_per_skill >= 1,
        "--prompts-per-skill must be >= 1"
    );
    ensure!(
        !cfg.noise_seeds.is_empty(),
        "--noise-seeds: give at least one seed"
    );
    ensure!(cfg.batch >= 1, "--batch must be >= 1");
    let mut seen = cfg.noise_seeds.clone();
    seen.sort_unstable();
    seen.dedup();
    ensure!(
        seen.len() == cfg.noise_seeds.len(),
        "--noise-seeds {:?} repeats a seed",
        cfg.noise_seeds
    );

    let samples = build_samples(
        &cfg.skills,
        cfg.prompts_per_skill,
        cfg.prompt_seed,
        &cfg.noise_seeds,
    );
    let rt = Runtime::new(RuntimeConfig {
        log_to_stderr: false,
        ..RuntimeConfig::default()
    })?;
    let mut verifier = rt
        .image_filter(&cfg.verifier)
        .with_context(|| format!("loading the verifier plugin {:?}", cfg.verifier))?;
    let params = verifier.default_params();

    let total = samples.len() * cfg.variants.len();
    let mut done = 0;
    progress(done, total);
    let mut results = Vec::with_capacity(cfg.variants.len());
    for v in &cfg.variants {
        let t = Instant::now();
        let mut r = load_variant(cfg, v)?;
        let dir = match &cfg.images {
            Some(root) => {
                let d = root.join(safe(&v.name));
                std::fs::create_dir_all(&d)
                    .with_context(|| format!("creating image folder {}", d.display()))?;
                Some(d)
            }
            None => None,
        };
        let mut pass = Vec::with_capacity(samples.len());
        let mut score = Vec::with_capacity(samples.len());
        for chunk in samples.chunks(cfg.batch) {
            let prompts: Vec<&str> = chunk.iter().map(|s| s.prompt.as_str()).collect();
            let seeds: Vec<u64> = chunk.iter().map(|s| s.seed).collect();
            let images = r
                .render(&prompts, &seeds, &cfg.sample)
                .with_context(|| format!("rendering variant {}", v.name))?;
            for (s, img) in chunk.iter().zip(&images) {
                let verdict = verifier.check(
                    &selma_runtime::RgbImage {
                        width: img.width as u32,
                        height: img.height as u32,
                        pixels: img.pixels.clone(),
                        non_finite: 0.0,
                    },
                    &s.prompt,
                    &params,
                )?;
                pass.push(verdict.keep);
                score.push(verdict.score);
                if let Some(d) = &dir {
                    let p = d.join(format!("{}-{:04}-{}.png", s.skill, s.index, s.noise_seed));
                    let text = format!(
                        "{}\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Variant: {}, Pass: {}",
                        s.prompt,
                        cfg.sample.steps,
                        cfg.sample.scheduler,
                        cfg.sample.guidance,
                        s.seed,
                        v.name,
                        verdict.keep
                    );
                    selma_diffusion::image_io::write_png(
                        &p,
                        img.width,
                        img.height,
                        &img.pixels,
                        &text,
                    )?;
                }
            }
            done += chunk.len();
            progress(done, total);
        }
        results.push(VariantResult {
            name: v.name.clone(),
            lora: v.lora.clone(),
            pass,
            score,
            seconds: t.elapsed().as_secs_f64(),
        });
    }
    Ok(summarise(cfg, samples, results))
}

fn rate(variant: &str, skill: &str, pass: &[bool], score: &[f32]) -> Rate {
    let xs: Vec<f64> = pass.iter().map(|&p| p as u8 as f64).collect();
    let (mean, lo, hi) = mean_ci95(&xs);
    let mean_score = if score.is_empty() {
        f64::NAN
    } else {
        score.iter().map(|&s| s as f64).sum::<f64>() / score.len() as f64
    };
    Rate {
        variant: variant.to_string(),
        skill: skill.to_string(),
        n: pass.len(),
        passed: pass.iter().filter(|&&p| p).count(),
        mean,
        lo,
        hi,
        mean_score,
    }
}

fn pick<T: Copy>(xs: &[T], idx: &[usize]) -> Vec<T> {
    idx.iter().map(|&i| xs[i]).collect()
}

/// Turn per-sample verdicts into the report's tables.
pub fn summarise(
    cfg: &EvalConfig,
    samples: Vec<Sample>,
    results: Vec<VariantResult>,
) -> EvalReport {
    let skills: Vec<String> = cfg.skills.iter().map(|f| f.name().to_string()).collect();
    // Sample indices per skill, then all of them.
    let mut groups: Vec<(String, Vec<usize>)> = skills
        .iter()
        .map(|k| {
            let idx = (0..samples.len())
                .filter(|&i| samples[i].skill == *k)
                .collect();
            (k.clone(), idx)
        })
        .collect();
    groups.push((ALL.to_string(), (0..samples.len()).collect()));
    // Bootstrap clusters: one per prompt (all its noise seeds together).
    let cluster: Vec<usize> = samples
        .iter()
        .map(|s| {
            let k = skills.iter().position(|x| *x == s.skill).unwrap_or(0);
            k * cfg.prompts_per_skill + s.index
        })
        .collect();

    let mut accuracy = Vec::new();
    let mut count_by_n = Vec::new();
    let mut paired = Vec::new();
    for r in &results {
        for (k, idx) in &groups {
            accuracy.push(rate(&r.name, k, &pick(&r.pass, idx), &pick(&r.score, idx)));
        }
        for n in 1..=4 {
            let idx: Vec<usize> = (0..samples.len())
                .filter(|&i| samples[i].skill == Form::Count.name() && samples[i].objects == n)
                .collect();
            if idx.is_empty() {
                continue;
            }
            let x = rate(&r.name, "count", &pick(&r.pass, &idx), &[]);
            count_by_n.push(Bucket {
                variant: r.name.clone(),
                objects: n,
                n: x.n,
                passed: x.passed,
                mean: x.mean,
                lo: x.lo,
                hi: x.hi,
            });
        }
    }
    let base = &results[0];
    for r in &results[1..] {
        for (k, idx) in &groups {
            paired.push(Paired {
                variant: r.name.clone(),
                skill: k.clone(),
                diff: paired_diff(
                    &pick(&base.pass, idx),
                    &pick(&r.pass, idx),
                    &pick(&cluster, idx),
                    cfg.bootstrap_resamples,
                    cfg.bootstrap_seed,
                ),
            });
        }
    }
    EvalReport {
        settings: Settings {
            model: cfg.model.clone(),
            skills,
            prompts_per_skill: cfg.prompts_per_skill,
            prompt_seed: cfg.prompt_seed,
            noise_seeds: cfg.noise_seeds.clone(),
            steps: cfg.sample.steps,
            guidance: cfg.sample.guidance,
            scheduler: cfg.sample.scheduler.to_string(),
            eta: cfg.sample.eta,
            verifier: cfg.verifier.clone(),
            bootstrap_resamples: cfg.bootstrap_resamples,
            bootstrap_seed: cfg.bootstrap_seed,
        },
        accuracy,
        count_by_n,
        paired,
        samples,
        variants: results,
    }
}

fn fmt3(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else {
        format!("{x:.3}")
    }
}

fn signed3(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else {
        format!("{x:+.3}")
    }
}

impl EvalReport {
    /// The pass rate of `variant` on `skill` (or `all`).
    pub fn rate(&self, variant: &str, skill: &str) -> Option<&Rate> {
        self.accuracy
            .iter()
            .find(|r| r.variant == variant && r.skill == skill)
    }

    /// The paired change of `variant` against the base on `skill` (or `all`).
    pub fn paired(&self, variant: &str, skill: &str) -> Option<&Paired> {
        self.paired
            .iter()
            .find(|r| r.variant == variant && r.skill == skill)
    }

    /// The plain-text tables printed by `selma shapeworld eval`.
    pub fn table(&self) -> String {
        let s = &self.settings;
        let mut o = String::new();
        let per = s.prompts_per_skill * s.noise_seeds.len();
        let _ = writeln!(
            o,
            "verifier pass rate [95% Wilson interval]; {} prompts x {} noise seed(s) = {per} samples per skill (prompt seed {}, noise seeds {:?}; {} steps {}, guidance {})",
            s.prompts_per_skill,
            s.noise_seeds.len(),
            s.prompt_seed,
            s.noise_seeds,
            s.steps,
            s.scheduler,
            s.guidance
        );
        let mut cols = s.skills.clone();
        cols.push(ALL.to_string());
        let w = self
            .variants
            .iter()
            .map(|v| v.name.len())
            .max()
            .unwrap_or(4)
            .max(8);
        let _ = write!(o, "{:w$}", "variant");
        for c in &cols {
            let _ = write!(o, "  {c:>19}");
        }
        o.push('\n');
        for v in &self.variants {
            let _ = write!(o, "{:w$}", v.name);
            for c in &cols {
                match self.rate(&v.name, c) {
                    Some(r) => {
                        let cell = format!("{} [{},{}]", fmt3(r.mean), fmt3(r.lo), fmt3(r.hi));
                        let _ = write!(o, "  {cell:>19}");
                    }
                    None => {
                        let _ = write!(o, "  {:>19}", "-");
                    }
                }
            }
            o.push('\n');
        }
        if !self.count_by_n.is_empty() {
            o.push_str("\ncount accuracy by number of objects asked for (samples)\n");
            let _ = write!(o, "{:w$}", "variant");
            let ns: std::collections::BTreeSet<usize> =
                self.count_by_n.iter().map(|b| b.objects).collect();
            for n in &ns {
                let _ = write!(o, "  {:>12}", format!("n={n}"));
            }
            o.push('\n');
            for v in &self.variants {
                let _ = write!(o, "{:w$}", v.name);
                for n in &ns {
                    match self
                        .count_by_n
                        .iter()
                        .find(|b| b.variant == v.name && b.objects == *n)
                    {
                        Some(b) => {
                            let _ = write!(o, "  {:>12}", format!("{} ({})", fmt3(b.mean), b.n));
                        }
                        None => {
                            let _ = write!(o, "  {:>12}", "-");
                        }
                    }
                }
                o.push('\n');
            }
        }
        if !self.paired.is_empty() {
            let _ = writeln!(
                o,
                "\npaired change against base, same prompts and noise: d [bootstrap 95%, prompts resampled, seed {}], +fixed/-broken, exact McNemar p",
                s.bootstrap_seed
            );
            for v in &self.variants[1..] {
                let _ = write!(o, "{:w$}", v.name);
                for c in &cols {
                    if let Some(p) = self.paired(&v.name, c) {
                        let d = &p.diff;
                        let _ = write!(
                            o,
                            "  {c}: {} [{},{}] +{}/-{} p={:.3}",
                            signed3(d.diff),
                            signed3(d.lo),
                            signed3(d.hi),
                            d.better,
                            d.worse,
                            d.p_mcnemar
                        );
                    }
                }
                o.push('\n');
            }
        }
        o
    }

    /// Write the JSON atomically (temporary sibling + rename).
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        selma_io::write_atomic(path, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Read a JSON written by [`EvalReport::write`].
    pub fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// Parse `NAME=FILE` of `--lora`.
pub fn parse_lora_variant(text: &str) -> Result<Variant> {
    let Some((name, file)) = text.split_once('=') else {
        bail!("--lora {text:?}: expected NAME=FILE, e.g. count=experts/count.safetensors");
    };
    let name = name.trim();
    ensure!(
        !name.is_empty() && name != "base",
        "--lora {text:?}: the NAME must be non-empty and not \"base\""
    );
    ensure!(!file.is_empty(), "--lora {text:?}: missing FILE");
    Ok(Variant {
        name: name.to_string(),
        lora: Some(PathBuf::from(file)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skills_parse_and_reject_unknowns() {
        assert_eq!(
            parse_skills("single, counting,sw-binding,spatial").unwrap(),
            DEFAULT_SKILLS.to_vec()
        );
        assert!(parse_skills("single,cubes").is_err());
        assert!(parse_skills("count,count").is_err());
        assert!(parse_skills("").is_err());
    }

    #[test]
    fn lora_variants_parse() {
        let v = parse_lora_variant("count=a/b.safetensors").unwrap();
        assert_eq!(v.name, "count");
        assert_eq!(v.lora.unwrap(), PathBuf::from("a/b.safetensors"));
        assert!(parse_lora_variant("base=x").is_err());
        assert!(parse_lora_variant("x.safetensors").is_err());
    }

    #[test]
    fn samples_are_seeded_and_noise_seeds_pair_up() {
        let a = build_samples(&DEFAULT_SKILLS, 20, 5, &[11, 22]);
        assert_eq!(a, build_samples(&DEFAULT_SKILLS, 20, 5, &[11, 22]));
        assert_eq!(a.len(), 4 * 20 * 2);
        let b = build_samples(&DEFAULT_SKILLS, 20, 6, &[11, 22]);
        assert_ne!(
            a.iter().map(|s| &s.prompt).collect::<Vec<_>>(),
            b.iter().map(|s| &s.prompt).collect::<Vec<_>>()
        );
        // A skill's prompts do not depend on the other skills evaluated.
        let only = build_samples(&[Form::Spatial], 20, 5, &[11, 22]);
        let spatial: Vec<&Sample> = a.iter().filter(|s| s.skill == "spatial").collect();
        assert_eq!(only.iter().collect::<Vec<_>>(), spatial);
        // Image seeds are distinct across prompts, skills and noise seeds.
        let mut seeds: Vec<u64> = a.iter().map(|s| s.seed).collect();
        seeds.sort_unstable();
        seeds.dedup();
        assert_eq!(seeds.len(), a.len());
        // Counts ask for the number in their caption.
        for s in a.iter().filter(|s| s.skill == "count") {
            let want = ["one", "two", "three", "four"][s.objects - 1];
            assert!(s.prompt.starts_with(want), "{s:?}");
        }
    }
}
