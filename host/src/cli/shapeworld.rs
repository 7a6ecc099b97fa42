//! `selma shapeworld`: render ShapeWorld datasets.

use anyhow::Result;
use clap::Subcommand;

/// ShapeWorld subcommands (filled in by the ShapeWorld work).
#[derive(Subcommand, Debug)]
pub enum ShapeworldCommand {}

/// Run a `selma shapeworld` subcommand.
pub fn run(c: ShapeworldCommand) -> Result<()> {
    match c {}
}
