//! The run report: one self-contained `report.html` (results table with the
//! best value per column marked, extra tables, per-skill image grids with
//! images inlined as `data:` URIs, a bar chart per skill ([`chart`]),
//! training loss curves as inline SVG, the
//! config), written atomically through `selma_io`; also the loss-log
//! reader. It reads `results`; nothing in `eval` below it imports it.

mod chart;
mod html;

use super::results::Results;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// One row of an image grid: the same prompt and seed across variants.
pub struct GridRow {
    /// The prompt.
    pub prompt: String,
    /// The sampling seed.
    pub seed: u64,
    /// (variant, image file) in column order.
    pub images: Vec<(String, PathBuf)>,
}

/// The image grid of one skill.
pub struct Grid {
    /// Skill name.
    pub skill: String,
    /// Rows (prompt + seed).
    pub rows: Vec<GridRow>,
}

/// One training loss curve.
pub struct LossCurve {
    /// Curve name (e.g. "expert:counting").
    pub name: String,
    /// (step, loss) points.
    pub points: Vec<(u64, f64)>,
}

/// Everything the report shows.
pub struct ReportInput {
    /// Page title.
    pub title: String,
    /// The results table (and extra tables).
    pub results: Results,
    /// Per-skill image grids.
    pub grids: Vec<Grid>,
    /// Training loss curves.
    pub loss_curves: Vec<LossCurve>,
    /// The run's configuration as TOML.
    pub config_toml: String,
    /// Free-text notes shown under the title.
    pub notes: Vec<String>,
}

/// The self-contained HTML (images inlined as data: URIs; no external resources).
pub fn render(input: &ReportInput) -> Result<String> {
    html::render(input)
}

/// render + write atomically (through `selma_io`).
pub fn write(path: &Path, input: &ReportInput) -> Result<()> {
    let html = render(input)?;
    selma_io::write_atomic(path, html.as_bytes())
}

/// Reads a training loss log (`loss.jsonl`, one {"step","loss",..} object per line).
///
/// A `null` loss (how serde_json writes NaN) is skipped; so is a truncated
/// last line without its newline (a process killed mid-write).
pub fn read_loss_log(path: &Path) -> Result<Vec<(u64, f64)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading loss log {}", path.display()))?;
    let complete = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let last_partial = !complete && i + 1 == lines.len();
        let v: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(_) if last_partial => break,
            Err(e) => bail!("{}:{}: not a JSON object: {e}", path.display(), i + 1),
        };
        let step = v.get("step").and_then(|s| s.as_u64()).with_context(|| {
            format!(
                "{}:{}: \"step\" is missing or not a non-negative integer",
                path.display(),
                i + 1
            )
        })?;
        match v.get("loss") {
            Some(serde_json::Value::Null) => continue,
            Some(l) => {
                let loss = l.as_f64().with_context(|| {
                    format!("{}:{}: \"loss\" is not a number", path.display(), i + 1)
                })?;
                out.push((step, loss));
            }
            None => bail!("{}:{}: no \"loss\" key", path.display(), i + 1),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
