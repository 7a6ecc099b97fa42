//! Evaluation and reporting, one way down: `results` (the results.json
//! types every other part shares) <- `scorer` (image-filter plugins,
//! CLIPScore, on the `clip` loader) and `stats` (means with 95% intervals)
//! <- `report` (report.html); `shapeworld` evaluates LoRA files for the
//! `selma shapeworld` commands.

pub mod clip;
pub mod report;
pub mod results;
pub mod scorer;
pub mod shapeworld;
pub mod stats;

#[cfg(test)]
mod scorer_tests;

pub use results::{Cell, Results, Table};
