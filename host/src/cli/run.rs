//! `selma run`: the whole SELMA pipeline from one TOML file.

use anyhow::Result;
use clap::Args;

/// Arguments of `selma run` (filled in by the pipeline work).
#[derive(Args, Debug)]
pub struct RunArgs {}

/// Run `selma run`.
pub fn run(_a: RunArgs) -> Result<()> {
    anyhow::bail!("selma run is not wired yet")
}
