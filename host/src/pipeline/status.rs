//! `selma status RUN_DIR`: each stage's state and counts, read from the run
//! directory's plan and manifests (no config, no models needed).

use super::store::{Manifest, RunDir};
use super::unit::Unit;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

/// One stage's line.
#[derive(Debug, Clone, PartialEq)]
pub struct StageStatus {
    /// Stage name.
    pub stage: String,
    /// Units planned by the last run.
    pub planned: usize,
    /// Units done.
    pub done: usize,
    /// Units started but not finished.
    pub partial: usize,
    /// Summed counts of the done units.
    pub counts: BTreeMap<String, f64>,
}

/// The status of every stage.
pub fn collect(run_dir: &Path) -> Result<Vec<StageStatus>> {
    let dir = RunDir::new(run_dir);
    let text = std::fs::read_to_string(dir.plan()).with_context(|| {
        format!(
            "{} is not a selma run directory (no .selma/plan.json; run `selma run` first)",
            run_dir.display()
        )
    })?;
    let plan: BTreeMap<String, Vec<String>> =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", dir.plan().display()))?;
    let mut out = vec![];
    for stage in super::config::Stage::ALL {
        let name = stage.name();
        let units = plan.get(name).cloned().unwrap_or_default();
        let manifests: Vec<Manifest> = dir.manifests(name);
        let mut st = StageStatus {
            stage: name.into(),
            planned: units.len(),
            done: 0,
            partial: 0,
            counts: BTreeMap::new(),
        };
        for u in &units {
            match manifests.iter().find(|m| &m.unit == u) {
                Some(m) if m.done => {
                    st.done += 1;
                    for (k, v) in &m.counts {
                        if !k.starts_with("pass_rate") && k != "last_loss" {
                            *st.counts.entry(k.clone()).or_default() += v;
                        }
                    }
                }
                Some(_) => st.partial += 1,
                None => {}
            }
        }
        if name == "eval" {
            let scored = manifests
                .iter()
                .filter(|m| m.done && matches!(m.unit.parse(), Ok(Unit::Scores(..))))
                .count();
            st.counts
                .insert("variant x skill scored".into(), scored as f64);
        }
        out.push(st);
    }
    Ok(out)
}

/// The status as a table.
pub fn render(run_dir: &Path) -> Result<String> {
    let rows = collect(run_dir)?;
    let mut s = String::new();
    writeln!(s, "run directory {}", run_dir.display())?;
    writeln!(s, "{:<8} {:<12} counts", "stage", "state")?;
    for r in rows {
        let state = if r.planned > 0 && r.done == r.planned {
            format!("done {}/{}", r.done, r.planned)
        } else if r.done > 0 || r.partial > 0 {
            format!("part {}/{}", r.done, r.planned)
        } else {
            format!("todo 0/{}", r.planned)
        };
        let counts: Vec<String> = r.counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let partial = if r.partial > 0 {
            format!(" ({} in progress)", r.partial)
        } else {
            String::new()
        };
        writeln!(
            s,
            "{:<8} {:<12} {}{partial}",
            r.stage,
            state,
            counts.join(", ")
        )?;
    }
    let rd = RunDir::new(run_dir);
    if rd.report().is_file() {
        writeln!(s, "report: {}", rd.report().display())?;
    }
    Ok(s)
}
