//! Command-line interface: argument parsing and dispatch to one module per
//! subcommand. Each subcommand module owns its clap `Args` and a `run`.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod generate;
mod merge;
mod model;
mod plugins;
mod prompts;
mod run;
mod shapeworld;
mod status;
mod train;

/// Teach a text-to-image diffusion model skills from its own auto-generated
/// data (SELMA): generate prompts per skill, render them with the model,
/// train one LoRA expert per skill, merge the experts.
#[derive(Parser, Debug)]
#[command(name = "selma", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the whole SELMA pipeline from a pipeline.toml (resumable, shardable).
    Run(Box<run::RunArgs>),
    /// Show each stage's state and counts in a run directory.
    Status(status::StatusArgs),
    /// List, inspect and scaffold plugins (skills, generators, filters, merges).
    #[command(subcommand)]
    Plugins(plugins::PluginsCommand),
    /// Generate prompts for one skill: generator plugin + prompt filters.
    Prompts(prompts::PromptsArgs),
    /// Merge LoRA experts with a merge-strategy plugin.
    Merge(merge::MergeArgs),
    /// Train a LoRA expert on an image-caption folder (SELMA's recipe by default).
    Train(Box<train::TrainArgs>),
    /// Render images from a diffusers model folder.
    Generate(generate::GenerateArgs),
    /// Create or inspect model folders.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// ShapeWorld: a small procedural world for measuring SELMA on a CPU.
    #[command(subcommand)]
    Shapeworld(shapeworld::ShapeworldCommand),
}

/// Parse the command line, run it, and turn errors into a readable message
/// and a non-zero exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => run::run(*a),
        Command::Status(a) => status::run(a),
        Command::Shapeworld(c) => shapeworld::run(c),
        Command::Plugins(c) => plugins::run(c),
        Command::Prompts(a) => prompts::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Train(a) => train::run(*a),
        Command::Generate(a) => generate::run(a),
        Command::Model(c) => model::run(c),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
