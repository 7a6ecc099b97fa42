//! The run report: one self-contained `report.html` (results table with the
//! best value per column marked, extra tables, per-skill image grids with
//! images inlined as `data:` URIs, training loss curves as inline SVG, the
//! config), written atomically; also the loss-log reader and the atomic
//! file writer that eval shares.

mod html;

use crate::eval;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// An extra named table of the report (and of results.json).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Table {
    /// Heading above the table.
    pub title: String,
    /// Column names.
    pub header: Vec<String>,
    /// Rows of cells.
    pub rows: Vec<Vec<String>>,
}

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
    pub results: eval::Results,
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

/// render + write atomically (temp file + rename).
pub fn write(path: &Path, input: &ReportInput) -> Result<()> {
    let html = render(input)?;
    write_atomic(path, html.as_bytes())
}

/// Writes `bytes` to a temporary file next to `path`, syncs it and renames
/// it over `path`: readers see the old file or the complete new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(d) = dir {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let tmp_name = format!(".{}.tmp.{}", name.to_string_lossy(), std::process::id());
    let tmp = match dir {
        Some(d) => d.join(tmp_name),
        None => PathBuf::from(tmp_name),
    };
    let res = (|| -> Result<()> {
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
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
