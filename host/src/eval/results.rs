//! results.json: the `Results` of an evaluation (every variant x skill x
//! scorer `Cell`, extra `Table`s) and its (de)serialisation. The scorers,
//! the pipeline's eval stage and the report all build on this module; it
//! depends on none of them.

use anyhow::{Context, Result};
use serde::{Deserialize, Deserializer, Serialize};
use std::path::Path;

/// Reads a number that JSON may hold as `null` (serde_json writes NaN so).
fn f64_or_nan<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// An extra named table of results.json (and of the report).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Table {
    /// Heading above the table.
    pub title: String,
    /// Column names.
    pub header: Vec<String>,
    /// Rows of cells.
    pub rows: Vec<Vec<String>>,
}

/// One cell of results.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    /// Model variant ("base", "expert:<skill>", "joint", "merged:<strategy>").
    pub variant: String,
    /// Skill whose held-out prompts were scored.
    pub skill: String,
    /// Scorer name.
    pub scorer: String,
    /// Mean score.
    #[serde(deserialize_with = "f64_or_nan")]
    pub mean: f64,
    /// Lower end of the 95% interval.
    #[serde(deserialize_with = "f64_or_nan")]
    pub lo: f64,
    /// Upper end of the 95% interval.
    #[serde(deserialize_with = "f64_or_nan")]
    pub hi: f64,
    /// Number of scored images.
    pub n: usize,
}

/// results.json: every variant x skill x scorer (variants in display order: "base", experts
/// "expert:<skill>", "joint", "merged:<strategy>").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Results {
    /// Variants in display order.
    pub variants: Vec<String>,
    /// Skills in display order.
    pub skills: Vec<String>,
    /// Scorers in display order.
    pub scorers: Vec<String>,
    /// Every variant x skill x scorer cell.
    pub cells: Vec<Cell>,
    /// Extra named tables (e.g. self-generation pass rates per skill).
    pub extra: Vec<Table>,
}

impl Results {
    /// Writes pretty JSON atomically (through `selma_io`).
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut text = serde_json::to_string_pretty(self).context("serialising results")?;
        text.push('\n');
        selma_io::write_atomic(path, text.as_bytes())
    }

    /// Reads a results.json written by [`Results::write`].
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading results {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| {
            format!(
                "parsing results {} (delete it and re-run the eval stage to rebuild it)",
                path.display()
            )
        })
    }

    /// The cell of `variant` x `skill` x `scorer`, if present.
    pub fn cell(&self, variant: &str, skill: &str, scorer: &str) -> Option<&Cell> {
        self.cells
            .iter()
            .find(|c| c.variant == variant && c.skill == skill && c.scorer == scorer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Results {
        Results {
            variants: vec!["base".into(), "merged:linear".into()],
            skills: vec!["counting".into()],
            scorers: vec!["clipscore".into()],
            cells: vec![
                Cell {
                    variant: "base".into(),
                    skill: "counting".into(),
                    scorer: "clipscore".into(),
                    mean: 21.5,
                    lo: 20.0,
                    hi: 23.0,
                    n: 4,
                },
                Cell {
                    variant: "merged:linear".into(),
                    skill: "counting".into(),
                    scorer: "clipscore".into(),
                    mean: f64::NAN,
                    lo: f64::NAN,
                    hi: f64::NAN,
                    n: 0,
                },
            ],
            extra: vec![Table {
                title: "pass rates".into(),
                header: vec!["skill".into(), "kept".into()],
                rows: vec![vec!["counting".into(), "0.75".into()]],
            }],
        }
    }

    #[test]
    fn results_round_trip_through_json() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("results.json");
        let r = sample();
        r.write(&p).unwrap();
        let back = Results::read(&p).unwrap();
        assert_eq!(back.variants, r.variants);
        assert_eq!(back.cells[0], r.cells[0]);
        assert_eq!(back.extra, r.extra);
        // NaN is written as null and read back as NaN
        assert!(back.cells[1].mean.is_nan() && back.cells[1].hi.is_nan());
        assert_eq!(
            back.cell("base", "counting", "clipscore").map(|c| c.n),
            Some(4)
        );
        // no temp file is left next to it
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("results.json")]);
    }

    #[test]
    fn unreadable_results_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("results.json");
        std::fs::write(&p, "{not json").unwrap();
        let e = format!("{:#}", Results::read(&p).unwrap_err());
        assert!(e.contains("results.json"), "{e}");
    }
}
