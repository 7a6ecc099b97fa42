//! Bar charts of the results: one inline SVG per skill for the primary
//! scorer, a bar per variant at its mean with a whisker over its 95%
//! interval and a dashed line at the base's mean, so "did the expert beat
//! the base" reads at a glance. Geometry is plain arithmetic on the cells;
//! every bar carries its numbers as data attributes.

use std::fmt::Write;

use super::html::esc;
use crate::eval::results::Results;

/// Plot area: width per bar, height, margins (px).
const BAR_W: f64 = 34.0;
const PLOT_H: f64 = 160.0;
const LEFT: f64 = 40.0;
const TOP: f64 = 24.0;
const BOTTOM: f64 = 100.0;

/// The y coordinate of value `v` on a 0..`top` axis.
fn y_of(v: f64, top: f64) -> f64 {
    TOP + PLOT_H * (1.0 - (v / top).clamp(0.0, 1.0))
}

/// The chart of `skill` under `scorer`: one bar per variant with a cell
/// (variants without one are left out). The axis runs from 0 to 1, or to
/// the largest interval end when scores exceed 1 (CLIPScore).
pub fn bars_svg(r: &Results, skill: &str, scorer: &str) -> String {
    let cells: Vec<_> = r
        .variants
        .iter()
        .filter_map(|v| r.cell(v, skill, scorer).map(|c| (v, c)))
        .filter(|(_, c)| c.mean.is_finite())
        .collect();
    let top = cells
        .iter()
        .map(|(_, c)| if c.hi.is_finite() { c.hi } else { c.mean })
        .fold(1.0f64, f64::max);
    let w = LEFT + BAR_W * cells.len().max(1) as f64 + 40.0;
    let h = TOP + PLOT_H + BOTTOM;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg class=\"bars\" data-skill=\"{}\" data-scorer=\"{}\" width=\"{w:.0}\" height=\"{h:.0}\" \
         viewBox=\"0 0 {w:.0} {h:.0}\" role=\"img\" aria-label=\"{} on {}: mean and 95% interval per variant\">",
        esc(skill),
        esc(scorer),
        esc(scorer),
        esc(skill)
    );
    let _ = writeln!(
        s,
        "<text class=\"ptitle\" x=\"{LEFT}\" y=\"14\">{}</text>",
        esc(skill)
    );
    for k in 0..=4 {
        let v = top * k as f64 / 4.0;
        let y = y_of(v, top);
        let _ = writeln!(
            s,
            "<line class=\"gridline\" x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/>\
             <text class=\"tick\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            w - 40.0,
            LEFT - 4.0,
            y + 3.0,
            super::html::axis_num(v)
        );
    }
    let base = cells.iter().find(|(v, _)| v.as_str() == "base");
    for (i, (v, c)) in cells.iter().enumerate() {
        let x = LEFT + BAR_W * i as f64 + 4.0;
        let bw = BAR_W - 8.0;
        let y = y_of(c.mean, top);
        let class = if v.as_str() == "base" {
            "bar base"
        } else {
            "bar"
        };
        let _ = writeln!(
            s,
            "<rect class=\"{class}\" data-variant=\"{}\" data-mean=\"{}\" data-lo=\"{}\" data-hi=\"{}\" \
             x=\"{x:.1}\" y=\"{y:.1}\" width=\"{bw:.1}\" height=\"{:.1}\"><title>{}: {:.3} [{:.3}, {:.3}]</title></rect>",
            esc(v),
            c.mean,
            c.lo,
            c.hi,
            TOP + PLOT_H - y,
            esc(v),
            c.mean,
            c.lo,
            c.hi
        );
        if c.lo.is_finite() && c.hi.is_finite() {
            let cx = x + bw / 2.0;
            let (ylo, yhi) = (y_of(c.lo, top), y_of(c.hi, top));
            let _ = writeln!(
                s,
                "<path class=\"whisker\" d=\"M{cx:.1} {ylo:.1}V{yhi:.1}M{:.1} {ylo:.1}h8M{:.1} {yhi:.1}h8\"/>",
                cx - 4.0,
                cx - 4.0
            );
        }
        let (lx, ly) = (x + bw / 2.0, TOP + PLOT_H + 8.0);
        let _ = writeln!(
            s,
            "<text class=\"label\" transform=\"translate({lx:.1} {ly:.1}) rotate(50)\">{}</text>",
            esc(v)
        );
    }
    if let Some((_, b)) = base {
        let y = y_of(b.mean, top);
        let _ = writeln!(
            s,
            "<line class=\"baseline\" data-mean=\"{}\" x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/>",
            b.mean,
            w - 40.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// The CSS of the charts.
pub const STYLE: &str = "
svg.bars{background:#fff;border:1px solid #ddd}
svg.bars .gridline{stroke:#eee}
svg.bars .tick,svg.bars .label{font-size:10px;fill:#555}
svg.bars .ptitle{font-size:12px;fill:#333}
svg.bars .bar{fill:#6a9fd4}
svg.bars .bar.base{fill:#aaa}
svg.bars .whisker{stroke:#333;fill:none}
svg.bars .baseline{stroke:#c33;stroke-dasharray:4 3}
";
