//! `selma shapeworld`: render ShapeWorld datasets (PNG folder +
//! metadata.jsonl) and draw caption sets for evaluation, over the
//! `selma-shapeworld` crate.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use selma_shapeworld::{
    sample_caption, write_dataset, DatasetOptions, Form, Mix, SampleOptions, SplitMix64,
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
}

/// Render a ShapeWorld dataset.
///
/// 32x32 scenes of 1-4 coloured shapes, each with a caption of the grammar
/// (single "a blue triangle", count "three red circles", binding "a red
/// square and a blue circle", spatial "a green triangle left of a yellow
/// square", plural "red circles"). Same seed, same bytes. The folder is
/// written to a temporary sibling and renamed when complete.
///
/// Example: selma shapeworld render --count 100000 --seed 1 --out data/sw
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
    /// Probability that a count scene with 3-4 objects keeps its number word
    /// ("three red circles"); otherwise its caption is "red circles".
    #[arg(long, default_value_t = 0.1, value_name = "P")]
    pub number_word_keep: f64,
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

/// Run a `selma shapeworld` subcommand.
pub fn run(c: ShapeworldCommand) -> Result<()> {
    match c {
        ShapeworldCommand::Render(a) => render(a),
        ShapeworldCommand::Prompts(a) => prompts(a),
    }
}

fn render(a: RenderArgs) -> Result<()> {
    let mix = Mix::parse(&a.mix).context("--mix")?;
    anyhow::ensure!(
        (0.0..=1.0).contains(&a.number_word_keep),
        "--number-word-keep must be in [0, 1], got {}",
        a.number_word_keep
    );
    let opts = DatasetOptions {
        count: a.count,
        seed: a.seed,
        sample: SampleOptions {
            mix,
            number_word_keep: a.number_word_keep,
        },
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
            let tmp = path.with_extension("partial");
            std::fs::write(&tmp, &text).with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, &path)
                .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        }
        None => std::io::stdout()
            .write_all(text.as_bytes())
            .context("writing to stdout")?,
    }
    Ok(())
}
