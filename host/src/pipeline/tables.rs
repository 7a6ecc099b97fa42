//! The run's tables: the self-generation pass-rate table, the aggregation of
//! an ablation or multi-seed run (means over seeds with Student-t intervals,
//! the mean over skills, a per-seed breakdown) and the plain-text tables a
//! finished run prints. Tables are told apart by titles written only here.

use super::plan::Plan;
use super::stages::eval::{groups, Variant};
use super::store::Manifest;
use super::unit::Unit;
use crate::eval::stats::{mean_ci95_t, mean_of_means_ci95};
use crate::eval::Table;
use crate::eval::{Cell, Results};
use std::collections::BTreeMap;

/// The title of the pass-rate table.
pub const PASS_RATES_TITLE: &str = "Self-generated training data: image-filter pass rates";

/// The title every ablation table starts with.
pub const ABLATION_TITLE: &str = "Ablation";

/// `0.550 [0.500, 0.600]`.
fn fmt_ci(c: &Cell) -> String {
    if c.mean.is_finite() {
        format!("{:.3} [{:.3}, {:.3}]", c.mean, c.lo, c.hi)
    } else {
        "n/a".into()
    }
}

/// results.json of an ablation or multi-seed run: cells per seed-aggregated
/// variant (mean over seeds, Student-t 95% interval over seeds, `n` = seeds;
/// with one untagged seed, the per-prompt cells), cells of skill `mean` (the
/// mean over skills), one ablation table per scorer, and with seeds a
/// per-seed breakdown table.
pub fn ablation_results(
    plan: &Plan,
    vs: &[Variant],
    scorers: Vec<String>,
    per_variant: Vec<Cell>,
    raw: &BTreeMap<(String, String, String), Vec<f64>>,
    pass_rates: Table,
) -> Results {
    let skills: Vec<String> = plan.skills.iter().map(|s| s.id.clone()).collect();
    let tagged = plan.loaded.cfg.run.seeds.is_some();
    // Per concrete variant: the mean over skills.
    let mut per_variant = per_variant;
    for v in vs {
        for sc in &scorers {
            let groups: Vec<Vec<f64>> = skills
                .iter()
                .filter_map(|s| raw.get(&(v.name.clone(), s.clone(), sc.clone())).cloned())
                .collect();
            if groups.len() != skills.len() {
                continue;
            }
            let (mean, lo, hi) = mean_of_means_ci95(&groups);
            per_variant.push(Cell {
                variant: v.name.clone(),
                skill: "mean".into(),
                scorer: sc.clone(),
                mean,
                lo,
                hi,
                n: groups.iter().map(|g| g.len()).sum(),
            });
        }
    }
    let group_names = groups(plan);
    let mut columns = skills.clone();
    columns.push("mean".into());
    let cells: Vec<Cell> = if !tagged {
        per_variant.clone()
    } else {
        let mut out = vec![];
        for g in &group_names {
            for s in &columns {
                for sc in &scorers {
                    let xs: Vec<f64> = vs
                        .iter()
                        .filter(|v| &v.group == g)
                        .filter_map(|v| {
                            per_variant
                                .iter()
                                .find(|c| c.variant == v.name && &c.skill == s && &c.scorer == sc)
                        })
                        .map(|c| c.mean)
                        .collect();
                    if xs.is_empty() {
                        continue;
                    }
                    let (mean, lo, hi) = mean_ci95_t(&xs);
                    out.push(Cell {
                        variant: g.clone(),
                        skill: s.clone(),
                        scorer: sc.clone(),
                        mean,
                        lo,
                        hi,
                        n: xs.len(),
                    });
                }
            }
        }
        out
    };
    let n_seeds = plan.seeds().len();
    let mut extra = vec![pass_rates];
    for sc in &scorers {
        let mut header = vec!["variant".to_string()];
        header.extend(skills.iter().cloned());
        header.push("mean over skills".into());
        let rows = group_names
            .iter()
            .map(|g| {
                let mut row = vec![g.clone()];
                for s in &columns {
                    row.push(
                        cells
                            .iter()
                            .find(|c| &c.variant == g && &c.skill == s && &c.scorer == sc)
                            .map_or("-".into(), fmt_ci),
                    );
                }
                row
            })
            .collect();
        extra.push(Table {
            title: format!(
                "{ABLATION_TITLE} ({sc}): mean with 95% interval {}",
                if tagged {
                    format!("over {n_seeds} seed(s) (Student t)")
                } else {
                    "over prompts".into()
                }
            ),
            header,
            rows,
        });
    }
    if tagged {
        let header = [
            "variant", "seed", "skill", "scorer", "mean", "lo", "hi", "n",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let rows = per_variant
            .iter()
            .map(|c| {
                let v = vs.iter().find(|v| v.name == c.variant);
                vec![
                    v.map_or(c.variant.clone(), |v| v.group.clone()),
                    v.map_or(String::new(), |v| v.replica.seed.to_string()),
                    c.skill.clone(),
                    c.scorer.clone(),
                    format!("{:.6}", c.mean),
                    format!("{:.6}", c.lo),
                    format!("{:.6}", c.hi),
                    c.n.to_string(),
                ]
            })
            .collect();
        extra.push(Table {
            title: "Per-seed breakdown (mean and 95% interval over prompts)".into(),
            header,
            rows,
        });
    }
    Results {
        variants: group_names,
        skills,
        scorers,
        cells,
        extra,
    }
}

/// The ablation tables of a results.json as aligned text (for stdout).
pub fn ablation_text(results: &Results) -> Option<String> {
    let tables: Vec<&Table> = results
        .extra
        .iter()
        .filter(|t| t.title.starts_with(ABLATION_TITLE) || t.title == PASS_RATES_TITLE)
        .collect();
    tables_text(&tables)
}

/// The results of a run without ablation as text: per scorer a table of
/// variants x skills (mean [95% interval]), then the pass-rate table.
pub fn results_text(results: &Results) -> Option<String> {
    let mut own = vec![];
    for scorer in &results.scorers {
        let mut header = vec!["variant".to_string()];
        header.extend(results.skills.iter().cloned());
        let rows = results
            .variants
            .iter()
            .map(|v| {
                let mut row = vec![v.clone()];
                row.extend(results.skills.iter().map(|s| {
                    results
                        .cell(v, s, scorer)
                        .map_or_else(|| "n/a".to_string(), fmt_ci)
                }));
                row
            })
            .collect();
        own.push(Table {
            title: format!("Results ({scorer}: mean [95% interval])"),
            header,
            rows,
        });
    }
    let mut tables: Vec<&Table> = own.iter().collect();
    tables.extend(results.extra.iter().filter(|t| t.title == PASS_RATES_TITLE));
    tables_text(&tables)
}

/// Plain-text tables with aligned columns.
fn tables_text(tables: &[&Table]) -> Option<String> {
    let mut out = String::new();
    for t in tables {
        let mut widths: Vec<usize> = t.header.iter().map(|h| h.chars().count()).collect();
        for r in &t.rows {
            for (i, c) in r.iter().enumerate() {
                if i < widths.len() {
                    widths[i] = widths[i].max(c.chars().count());
                }
            }
        }
        out.push_str(&t.title);
        out.push('\n');
        for r in std::iter::once(&t.header).chain(&t.rows) {
            let line: Vec<String> = r
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{c:<w$}", w = widths.get(i).copied().unwrap_or(0)))
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
        out.push('\n');
    }
    (!out.is_empty()).then_some(out)
}

/// Self-generation pass rates per skill (the image filters' verdicts).
pub fn pass_rates(plan: &Plan) -> Table {
    let mut header = vec![
        "skill".to_string(),
        "prompts".into(),
        "images".into(),
        "kept".into(),
        "pass rate".into(),
    ];
    let filter_names: Vec<String> = plan
        .image_filters
        .iter()
        .map(|f| {
            plan.plugin_names
                .get(f)
                .cloned()
                .unwrap_or_else(|| f.clone())
        })
        .collect();
    header.extend(filter_names.iter().map(|n| format!("pass rate {n}")));
    let mut rows = vec![];
    for s in &plan.skills {
        let p = plan
            .dir
            .manifest("prompts", &Unit::Prompts(s.id.clone()).to_string());
        let f = plan
            .dir
            .manifest("images", &Unit::Filter(s.id.clone()).to_string());
        let c = |m: &Option<Manifest>, k: &str| -> Option<f64> {
            m.as_ref().and_then(|m| m.counts.get(k).copied())
        };
        let fmt_n = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.0}"));
        let fmt_p = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{:.1}%", 100.0 * v));
        let mut row = vec![
            s.id.clone(),
            fmt_n(c(&p, "prompts")),
            fmt_n(c(&f, "generated")),
            fmt_n(c(&f, "kept")),
            fmt_p(c(&f, "pass_rate")),
        ];
        for n in &filter_names {
            row.push(fmt_p(c(&f, &format!("pass_rate:{n}"))));
        }
        rows.push(row);
    }
    Table {
        title: PASS_RATES_TITLE.into(),
        header,
        rows,
    }
}
