//! `selma status`: each stage's state and counts in a run directory.

use anyhow::Result;
use clap::Args;

/// Arguments of `selma status` (filled in by the pipeline work).
#[derive(Args, Debug)]
pub struct StatusArgs {}

/// Run `selma status`.
pub fn run(_a: StatusArgs) -> Result<()> {
    anyhow::bail!("selma status is not wired yet")
}
