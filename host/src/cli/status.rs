//! `selma status`: each stage's state and counts in a run directory.

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

/// Show each stage's state and counts in a run directory.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The run directory.
    #[arg(value_name = "RUN_DIR")]
    pub run_dir: PathBuf,
}

/// Run `selma status`.
pub fn run(a: StatusArgs) -> Result<()> {
    print!("{}", crate::pipeline::status::render(&a.run_dir)?);
    Ok(())
}
