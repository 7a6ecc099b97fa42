//! `selma shapeworld`: render ShapeWorld datasets (PNG folder +
//! metadata.jsonl), draw caption sets for evaluation, and measure a model's
//! verifier accuracy per skill (`eval`, over `crate::eval::shapeworld`).

use crate::eval::shapeworld::{
    self,
    accuracy::{parse_lora_variant, parse_skills},
    EvalConfig, SampleSettings, Variant,
};
use anyhow::{ensure, Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use selma_diffusion::pipeline::parse_device;
use selma_diffusion::scheduler::SchedulerKind;
use selma_rng::SplitMix64;
use selma_shapeworld::{
    sample_caption, write_dataset, AltTextRates, DatasetOptions, Form, Mix, SampleOptions, World,
};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

/// ShapeWorld subcommands.
#[derive(Subcommand, Debug)]
pub enum ShapeworldCommand {
    /// Render N scenes with captions into DIR (PNG files + metadata.jsonl).
    Render(RenderArgs),
    /// Print N captions of one form (one per line), e.g. an evaluation prompt set.
    Prompts(PromptsArgs),
    /// Verifier accuracy per skill of a model and LoRA variants, with paired tests.
    Eval(Box<EvalArgs>),
    /// Self-generate a dataset: a model renders a prompt file, the verifier judges.
    Selfgen(SelfgenArgs),
}

/// Render a ShapeWorld dataset.
///
/// 32x32 scenes of 1-4 coloured shapes, each with a caption of the grammar
/// (single "a blue triangle", count "three red circles", binding "a red
/// square and a blue circle", spatial "a green triangle left of a yellow
/// square", plural "red circles"). Same seed, same bytes. The folder is
/// written to a temporary sibling and renamed when complete.
///
/// World v2 (--world v2) draws the same scenes but captions them in web
/// alt-text style, leaving out part of each scene at stated rates (--alt-text):
/// "circles", "a red square" (beside a blue circle), "two triangles". A model
/// pretrained on it draws every scene but follows the detailed prompts of the
/// skills unreliably, the weakness SELMA fine-tunes away.
///
/// Example: selma shapeworld render --count 100000 --seed 1 --out data/sw
/// Example: selma shapeworld render --world v2 --count 100000 --seed 1 --out data/sw2
#[derive(Args, Debug)]
pub struct RenderArgs {
    /// Number of scenes.
    #[arg(long, value_name = "N")]
    pub count: usize,
    /// Seed (scene i depends only on the seed and i).
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub seed: u64,
    /// Output folder (must not exist or be empty, unless --overwrite).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Shares of the caption forms, e.g. single=0.2,count=0.4,binding=0.2,spatial=0.2
    /// (forms: single, count, plural, binding, spatial; unnamed forms get 0).
    #[arg(long, default_value = "single=0.2,count=0.4,binding=0.2,spatial=0.2")]
    pub mix: String,
    /// Which world's captions: v1 (the grammar's captions, weak at counting
    /// by vocabulary) or v2 (alt-text captions that leave out objects,
    /// colours, numbers and relations: weak at following detailed prompts;
    /// metadata.jsonl then also holds each scene's `detailed` caption). The
    /// scenes of a seed are the same in both.
    #[arg(long, default_value = "v1", value_name = "WORLD")]
    pub world: String,
    /// World v1: probability that a count scene with 3-4 objects keeps its
    /// number word ("three red circles"); otherwise its caption is "red
    /// circles". [default: 0.1]
    #[arg(long, value_name = "P")]
    pub number_word_keep: Option<f64>,
    /// World v2: the alt-text rates, e.g.
    /// mention_all=0.5,color=0.6,number=0.35,relation=0.15 (the defaults;
    /// unnamed rates keep theirs): a scene of several kinds mentions all of
    /// them, a mention says its colour, its number word, and two single
    /// objects are related, each with that probability.
    #[arg(long, value_name = "RATES")]
    pub alt_text: Option<String>,
    /// Replace a non-empty output folder.
    #[arg(long)]
    pub overwrite: bool,
    /// Worker threads (0: all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// Print captions of one form.
///
/// Draws N captions independently and uniformly from the form's grammar (count:
/// n uniform in one..four, always with its number word), seeded.
///
/// Example: selma shapeworld prompts --skill spatial --count 200 --seed 7
#[derive(Args, Debug)]
pub struct PromptsArgs {
    /// Form: single, count, plural, binding or spatial (an `sw-` prefix is allowed).
    #[arg(long, value_name = "FORM")]
    pub skill: String,
    /// Number of captions.
    #[arg(long, value_name = "N")]
    pub count: usize,
    /// Seed.
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub seed: u64,
    /// Print JSON lines {"text", "skill"} instead of plain text.
    #[arg(long)]
    pub json: bool,
    /// Write to this file instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// Measure verifier accuracy per skill.
///
/// Draws --prompts-per-skill held-out captions per skill with --prompt-seed
/// (the list `selma shapeworld prompts --skill K --seed S` prints), renders
/// each once per noise seed with the base model and with the base plus each
/// --lora (same prompts, same noise), and judges every image with the
/// verifier plugin. Prints pass rates with 95% Wilson intervals, count
/// accuracy per number of objects, and each LoRA's paired change against the
/// base (bootstrap 95% interval over prompts, exact McNemar p); --out writes
/// all of it with every per-image verdict as JSON. Never use an evaluation
/// prompt seed for tuning.
///
/// Example: selma shapeworld eval --model models/shapeworld-base --lora count=count.safetensors --out results.json
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Diffusers model folder (the base).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// A LoRA variant NAME=FILE (weight 1; repeatable).
    #[arg(long = "lora", value_name = "NAME=FILE")]
    pub loras: Vec<String>,
    /// Skills, comma-separated: single, count, binding, spatial (plural too).
    #[arg(long, default_value = "single,count,binding,spatial")]
    pub skills: String,
    /// Prompts drawn per skill.
    #[arg(long, default_value_t = 200, value_name = "N")]
    pub prompts_per_skill: usize,
    /// Seed of the prompt draw.
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub prompt_seed: u64,
    /// Noise seeds: every prompt is rendered once per seed.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "11,22",
        value_name = "S,S"
    )]
    pub noise_seeds: Vec<u64>,
    /// Denoising steps.
    #[arg(long, default_value_t = 25)]
    pub steps: usize,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 1.5, value_name = "G")]
    pub guidance: f64,
    /// Sampler: ddim, euler, euler-a or dpm++2m.
    #[arg(long, default_value = "ddim", value_name = "NAME")]
    pub scheduler: SchedulerKind,
    /// DDIM eta (0: deterministic).
    #[arg(long, default_value_t = 0.0, value_name = "E")]
    pub eta: f64,
    /// Images rendered per batch.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub batch: usize,
    /// The image-filter plugin that judges (bundled name or .wasm path).
    #[arg(long, default_value = "shapeworld-verifier", value_name = "PLUGIN")]
    pub verifier: String,
    /// Bootstrap resamples of the paired difference.
    #[arg(long, default_value_t = 2000, value_name = "N")]
    pub bootstrap: usize,
    /// Seed of the bootstrap.
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub bootstrap_seed: u64,
    /// Device: cpu or cuda:N.
    #[arg(long, default_value = "cpu", value_name = "DEV")]
    pub device: String,
    /// Write the results (tables and every verdict) as JSON.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Write every image as DIR/VARIANT/SKILL-INDEX-NOISESEED.png.
    #[arg(long, value_name = "DIR")]
    pub images: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

fn eval(a: EvalArgs) -> Result<()> {
    ensure!(a.steps >= 1, "--steps must be at least 1");
    ensure!(a.eta >= 0.0, "--eta must be >= 0");
    let mut variants = vec![Variant {
        name: "base".into(),
        lora: None,
    }];
    for l in &a.loras {
        variants.push(parse_lora_variant(l)?);
    }
    let cfg = EvalConfig {
        model: a.model.clone(),
        variants,
        skills: parse_skills(&a.skills)?,
        prompts_per_skill: a.prompts_per_skill,
        prompt_seed: a.prompt_seed,
        noise_seeds: a.noise_seeds.clone(),
        sample: SampleSettings {
            steps: a.steps,
            guidance: a.guidance,
            scheduler: a.scheduler,
            eta: a.eta,
        },
        batch: a.batch,
        images: a.images.clone(),
        device: parse_device(&a.device)?,
        bootstrap_resamples: a.bootstrap,
        bootstrap_seed: a.bootstrap_seed,
        verifier: a.verifier.clone(),
    };
    let bar = if a.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} image {pos}/{len} [{bar:30}] {elapsed_precise} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let t = Instant::now();
    let report = shapeworld::accuracy::run(&cfg, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    print!("{}", report.table());
    let n: usize = report.variants.iter().map(|v| v.pass.len()).sum();
    eprintln!(
        "{n} images in {:.1} s ({:.3} s/image)",
        t.elapsed().as_secs_f64(),
        t.elapsed().as_secs_f64() / n.max(1) as f64
    );
    if let Some(out) = &a.out {
        report.write(out)?;
        println!("wrote {}", out.display());
    }
    Ok(())
}

/// Self-generate training data with the verifier as image filter.
///
/// Renders prompt i of --prompts (one per line) from noise seeded --seed + i
/// in batches, judges each image with the verifier, and writes a dataset
/// folder (NNNNN.png + metadata.jsonl with file_name, text, seed, score,
/// keep) for `selma train --data`; --only-passing drops rejected images.
///
/// Example: selma shapeworld selfgen --model base --prompts count.txt --seed 7 --only-passing --out data/count
#[derive(Args, Debug)]
pub struct SelfgenArgs {
    /// Diffusers model folder.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Prompt file, one per line (blank and `#` lines skipped).
    #[arg(long, value_name = "FILE")]
    pub prompts: PathBuf,
    /// Seed of the first image (image i uses seed + i).
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub seed: u64,
    /// Output dataset folder (new).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Write only the images the verifier passes.
    #[arg(long)]
    pub only_passing: bool,
    /// Denoising steps.
    #[arg(long, default_value_t = 25)]
    pub steps: usize,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 1.5, value_name = "G")]
    pub guidance: f64,
    /// Sampler: ddim, euler, euler-a or dpm++2m.
    #[arg(long, default_value = "ddim", value_name = "NAME")]
    pub scheduler: SchedulerKind,
    /// Images rendered per batch.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub batch: usize,
    /// The image-filter plugin that judges.
    #[arg(long, default_value = "shapeworld-verifier", value_name = "PLUGIN")]
    pub verifier: String,
    /// Device: cpu or cuda:N.
    #[arg(long, default_value = "cpu", value_name = "DEV")]
    pub device: String,
    /// No progress bar.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

fn selfgen(a: SelfgenArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.prompts)
        .with_context(|| format!("reading prompts file {}", a.prompts.display()))?;
    let prompts: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    ensure!(
        !prompts.is_empty(),
        "prompts file {} has no prompts (one per line)",
        a.prompts.display()
    );
    let bar = if a.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    let t = Instant::now();
    let s = shapeworld::selfgen::self_generate(
        &a.model,
        &parse_device(&a.device)?,
        &prompts,
        a.seed,
        &SampleSettings {
            steps: a.steps,
            guidance: a.guidance,
            scheduler: a.scheduler,
            eta: 0.0,
        },
        a.batch,
        &a.verifier,
        a.only_passing,
        &a.out,
        &mut |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )?;
    bar.finish_and_clear();
    println!(
        "rendered {} images in {:.1} s: {} passed ({:.3}), {} written to {}",
        s.rendered,
        t.elapsed().as_secs_f64(),
        s.passed,
        s.passed as f64 / s.rendered as f64,
        s.written,
        a.out.display()
    );
    Ok(())
}

/// Run a `selma shapeworld` subcommand.
pub fn run(c: ShapeworldCommand) -> Result<()> {
    match c {
        ShapeworldCommand::Render(a) => render(a),
        ShapeworldCommand::Prompts(a) => prompts(a),
        ShapeworldCommand::Eval(a) => eval(*a),
        ShapeworldCommand::Selfgen(a) => selfgen(a),
    }
}

fn render(a: RenderArgs) -> Result<()> {
    let mix = Mix::parse(&a.mix).context("--mix")?;
    let world = World::from_name(&a.world).context("--world")?;
    let mut sample = SampleOptions::world(world);
    sample.mix = mix;
    match world {
        World::V1 => {
            anyhow::ensure!(
                a.alt_text.is_none(),
                "--alt-text sets world v2's captions: add --world v2"
            );
            if let Some(p) = a.number_word_keep {
                anyhow::ensure!(
                    (0.0..=1.0).contains(&p),
                    "--number-word-keep must be in [0, 1], got {p}"
                );
                sample.number_word_keep = p;
            }
        }
        World::V2 => {
            anyhow::ensure!(
                a.number_word_keep.is_none(),
                "--number-word-keep is world v1's knob: world v2 sets how often number words are said with --alt-text number=P"
            );
            if let Some(text) = &a.alt_text {
                sample.alt_text = Some(parse_alt_text(text).context("--alt-text")?);
            }
        }
    }
    let opts = DatasetOptions {
        count: a.count,
        seed: a.seed,
        sample,
        overwrite: a.overwrite,
        threads: a.threads,
    };
    let t = Instant::now();
    let s = write_dataset(&a.out, &opts)?;
    let per: Vec<String> = s
        .per_skill
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    println!(
        "wrote {} scenes to {} in {:.2} s ({})",
        s.count,
        a.out.display(),
        t.elapsed().as_secs_f64(),
        per.join(", ")
    );
    Ok(())
}

/// Parse "mention_all=0.5,color=0.6" over world v2's default rates.
pub fn parse_alt_text(text: &str) -> Result<AltTextRates> {
    let mut r = AltTextRates::default();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, value) = part
            .split_once('=')
            .with_context(|| format!("\"{part}\": expected rate=P"))?;
        let v: f64 = value
            .trim()
            .parse()
            .with_context(|| format!("\"{part}\": {value} is not a number"))?;
        let slot = match name.trim() {
            "mention_all" => &mut r.mention_all,
            "color" => &mut r.color,
            "number" => &mut r.number,
            "relation" => &mut r.relation,
            other => anyhow::bail!(
                "unknown alt-text rate \"{other}\": use mention_all, color, number or relation"
            ),
        };
        *slot = v;
    }
    r.validate()?;
    Ok(r)
}

fn prompts(a: PromptsArgs) -> Result<()> {
    let name = a.skill.strip_prefix("sw-").unwrap_or(&a.skill);
    let form = Form::from_name(name).context("--skill")?;
    let mut rng = SplitMix64::new(a.seed);
    let mut text = String::new();
    for _ in 0..a.count {
        let c = sample_caption(form, &mut rng);
        if a.json {
            let line = serde_json::json!({ "text": c.text(), "skill": form.name() });
            text.push_str(&line.to_string());
        } else {
            text.push_str(&c.text());
        }
        text.push('\n');
    }
    match a.out {
        Some(path) => {
            selma_io::write_atomic(&path, text.as_bytes())?;
        }
        None => std::io::stdout()
            .write_all(text.as_bytes())
            .context("writing to stdout")?,
    }
    Ok(())
}
