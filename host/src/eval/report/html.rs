//! HTML rendering of the report: escaping, base64 `data:` URIs, the results
//! table, image grids and inline SVG loss plots. No JavaScript libraries and
//! no external resources (a Content-Security-Policy forbids them).

use super::{Grid, LossCurve, ReportInput};
use crate::eval::results::{Cell, Results, Table};
use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::path::Path;

/// Images larger than this are re-encoded as a smaller JPEG thumbnail.
const MAX_INLINE_BYTES: usize = 300_000;
/// Longest side of a re-encoded thumbnail.
const THUMB_SIDE: u32 = 384;
/// Loss curves with more points are averaged into this many buckets.
const MAX_PLOT_POINTS: usize = 1000;

/// Escapes text for HTML element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// Standard base64 (RFC 4648, with padding).
pub fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut o = String::with_capacity(data.len().div_ceil(3) * 4);
    for ch in data.chunks(3) {
        let b = [ch[0], *ch.get(1).unwrap_or(&0), *ch.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        o.push(A[(n >> 18) as usize & 63] as char);
        o.push(A[(n >> 12) as usize & 63] as char);
        o.push(if ch.len() > 1 {
            A[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        o.push(if ch.len() > 2 {
            A[n as usize & 63] as char
        } else {
            '='
        });
    }
    o
}

/// The MIME type of PNG, JPEG or WebP bytes, from their magic numbers.
pub fn sniff_mime(b: &[u8]) -> Option<&'static str> {
    if b.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if b.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some("image/jpeg")
    } else if b.len() >= 12 && &b[..4] == b"RIFF" && &b[8..12] == b"WEBP" {
        Some("image/webp")
    } else {
        None
    }
}

/// A `data:` URI of the image file (large files as a JPEG thumbnail).
pub fn image_data_uri(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| {
        format!(
            "reading image {} for the report (re-run the eval stage to regenerate it)",
            path.display()
        )
    })?;
    let Some(mime) = sniff_mime(&bytes) else {
        bail!(
            "{}: not a PNG, JPEG or WebP image, cannot inline it in the report",
            path.display()
        );
    };
    if bytes.len() <= MAX_INLINE_BYTES {
        return Ok(format!("data:{mime};base64,{}", base64(&bytes)));
    }
    let img = image::load_from_memory(&bytes)
        .with_context(|| format!("decoding image {}", path.display()))?;
    let thumb = img.thumbnail(THUMB_SIDE, THUMB_SIDE).to_rgb8();
    let mut jpg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpg, 90)
        .encode_image(&thumb)
        .with_context(|| format!("encoding a thumbnail of {}", path.display()))?;
    Ok(format!("data:image/jpeg;base64,{}", base64(&jpg)))
}

/// An HTML id fragment from free text (lowercase ASCII alphanumerics and '-').
fn slug(s: &str) -> String {
    let mut o = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            o.push(c.to_ascii_lowercase());
        } else if !o.ends_with('-') {
            o.push('-');
        }
    }
    o.trim_matches('-').to_string()
}

/// Decimals for a column: 2 when its values reach 10 (CLIPScore), else 3.
fn decimals(values: &[f64]) -> usize {
    let m = values
        .iter()
        .filter(|v| v.is_finite())
        .fold(0f64, |a, v| a.max(v.abs()));
    if m >= 10.0 {
        2
    } else {
        3
    }
}

fn fmt_num(v: f64, d: usize) -> String {
    if v.is_finite() {
        format!("{v:.d$}")
    } else {
        "n/a".into()
    }
}

/// One value of the results table: mean, its interval (none for means over
/// skills) and the number of scores behind it.
type Value = (f64, Option<(f64, f64)>, usize);

/// One column of the results table: its values per variant.
struct Column {
    key: (String, String),
    cells: Vec<Option<Value>>,
}

fn results_table(out: &mut String, r: &Results) {
    let mut cols: Vec<Column> = vec![];
    for skill in &r.skills {
        for scorer in &r.scorers {
            let cells = r
                .variants
                .iter()
                .map(|v| {
                    r.cell(v, skill, scorer)
                        .map(|c| (c.mean, Some((c.lo, c.hi)), c.n))
                })
                .collect();
            cols.push(Column {
                key: (skill.clone(), scorer.clone()),
                cells,
            });
        }
    }
    let n_skill_cols = cols.len();
    for scorer in &r.scorers {
        let cells = r
            .variants
            .iter()
            .map(|v| {
                let ms: Vec<&Cell> = r
                    .skills
                    .iter()
                    .filter_map(|s| r.cell(v, s, scorer))
                    .collect();
                if ms.len() == r.skills.len() && !ms.is_empty() {
                    let mean = ms.iter().map(|c| c.mean).sum::<f64>() / ms.len() as f64;
                    Some((mean, None, ms.iter().map(|c| c.n).sum()))
                } else {
                    None
                }
            })
            .collect();
        cols.push(Column {
            key: ("mean".into(), scorer.clone()),
            cells,
        });
    }
    let ns = r.scorers.len();
    out.push_str(
        "<table id=\"results\" class=\"results\">\n<thead>\n<tr><th rowspan=\"2\">variant</th>",
    );
    for skill in &r.skills {
        let _ = write!(out, "<th colspan=\"{ns}\">{}</th>", esc(skill));
    }
    let _ = write!(
        out,
        "<th colspan=\"{ns}\" class=\"meancol\">mean over skills</th></tr>\n<tr>"
    );
    for c in &cols {
        let _ = write!(out, "<th>{}</th>", esc(&c.key.1));
    }
    out.push_str("</tr>\n</thead>\n<tbody>\n");
    let best: Vec<Option<f64>> = cols
        .iter()
        .map(|c| {
            c.cells
                .iter()
                .flatten()
                .map(|x| x.0)
                .filter(|m| m.is_finite())
                .fold(None, |a: Option<f64>, m| Some(a.map_or(m, |a| a.max(m))))
        })
        .collect();
    let dec: Vec<usize> = cols
        .iter()
        .map(|c| decimals(&c.cells.iter().flatten().map(|x| x.0).collect::<Vec<_>>()))
        .collect();
    for (vi, variant) in r.variants.iter().enumerate() {
        let _ = write!(
            out,
            "<tr data-variant=\"{0}\"><th scope=\"row\">{0}</th>",
            esc(variant)
        );
        for (ci, c) in cols.iter().enumerate() {
            let class = if ci >= n_skill_cols { " meancol" } else { "" };
            let attrs = format!(
                "data-skill=\"{}\" data-scorer=\"{}\"",
                esc(&c.key.0),
                esc(&c.key.1)
            );
            match c.cells[vi] {
                None => {
                    let _ = write!(out, "<td class=\"missing{class}\" {attrs}>&ndash;</td>");
                }
                Some((mean, ci95, n)) => {
                    let d = dec[ci];
                    let is_best = best[ci] == Some(mean);
                    let val = fmt_num(mean, d);
                    let val = if is_best {
                        format!("<strong>{val}</strong>")
                    } else {
                        val
                    };
                    let interval = match ci95 {
                        Some((lo, hi)) => format!(
                            " <span class=\"ci\">[{}, {}]</span>",
                            fmt_num(lo, d),
                            fmt_num(hi, d)
                        ),
                        None => String::new(),
                    };
                    let _ = write!(
                        out,
                        "<td class=\"{}{class}\" {attrs} title=\"n = {n}\">{val}{interval}</td>",
                        if is_best { "best" } else { "val" }
                    );
                }
            }
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody>\n</table>\n");
}

fn extra_table(out: &mut String, t: &Table) {
    let _ = writeln!(
        out,
        "<h3 id=\"extra-{}\">{}</h3>\n<table class=\"extra\">",
        slug(&t.title),
        esc(&t.title)
    );
    out.push_str("<thead><tr>");
    for h in &t.header {
        let _ = write!(out, "<th>{}</th>", esc(h));
    }
    out.push_str("</tr></thead>\n<tbody>\n");
    for row in &t.rows {
        out.push_str("<tr>");
        for c in row {
            let _ = write!(out, "<td>{}</td>", esc(c));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody>\n</table>\n");
}

fn grid_html(out: &mut String, g: &Grid, variant_order: &[String]) -> Result<()> {
    // columns: the results' variant order, then any others as first seen
    let mut cols: Vec<String> = variant_order
        .iter()
        .filter(|v| {
            g.rows
                .iter()
                .any(|r| r.images.iter().any(|(iv, _)| iv == *v))
        })
        .cloned()
        .collect();
    for row in &g.rows {
        for (v, _) in &row.images {
            if !cols.contains(v) {
                cols.push(v.clone());
            }
        }
    }
    let _ = writeln!(
        out,
        "<h3 id=\"grid-{}\">{}</h3>\n<table class=\"grid\" data-skill=\"{}\">",
        slug(&g.skill),
        esc(&g.skill),
        esc(&g.skill)
    );
    out.push_str("<thead><tr><th>prompt</th><th>seed</th>");
    for v in &cols {
        let _ = write!(out, "<th>{}</th>", esc(v));
    }
    out.push_str("</tr></thead>\n<tbody>\n");
    for row in &g.rows {
        let _ = write!(
            out,
            "<tr><td class=\"prompt\">{}</td><td class=\"seed\">{}</td>",
            esc(&row.prompt),
            row.seed
        );
        for v in &cols {
            match row.images.iter().find(|(iv, _)| iv == v) {
                Some((_, path)) => {
                    let uri = image_data_uri(path)?;
                    let _ = write!(
                        out,
                        "<td><img src=\"{uri}\" alt=\"{}: {} (seed {})\" data-variant=\"{}\"></td>",
                        esc(v),
                        esc(&row.prompt),
                        row.seed,
                        esc(v)
                    );
                }
                None => out.push_str("<td class=\"missing\">&ndash;</td>"),
            }
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody>\n</table>\n");
    Ok(())
}

/// A number for an axis label: short, without trailing noise.
pub(super) fn axis_num(v: f64) -> String {
    let a = v.abs();
    if v.fract() == 0.0 && a < 1e9 {
        format!("{v:.0}")
    } else if a != 0.0 && !(1e-3..1e5).contains(&a) {
        format!("{v:.2e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// The points to plot: finite losses, averaged into buckets when many.
fn plot_points(points: &[(u64, f64)]) -> Vec<(f64, f64)> {
    let pts: Vec<(f64, f64)> = points
        .iter()
        .filter(|p| p.1.is_finite())
        .map(|&(s, l)| (s as f64, l))
        .collect();
    if pts.len() <= MAX_PLOT_POINTS {
        return pts;
    }
    let per = pts.len().div_ceil(MAX_PLOT_POINTS);
    pts.chunks(per)
        .map(|c| {
            let n = c.len() as f64;
            (
                c.iter().map(|p| p.0).sum::<f64>() / n,
                c.iter().map(|p| p.1).sum::<f64>() / n,
            )
        })
        .collect()
}

/// Trailing moving average over `w` points.
fn moving_average(pts: &[(f64, f64)], w: usize) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(pts.len());
    let mut sum = 0.0;
    for i in 0..pts.len() {
        sum += pts[i].1;
        if i >= w {
            sum -= pts[i - w].1;
        }
        let n = (i + 1).min(w) as f64;
        out.push((pts[i].0, sum / n));
    }
    out
}

/// One loss curve as an inline SVG line plot (raw and moving average).
pub fn loss_svg(c: &LossCurve) -> String {
    let pts = plot_points(&c.points);
    let (w, h) = (440.0, 250.0);
    let (ml, mr, mt, mb) = (62.0, 14.0, 26.0, 38.0);
    let mut s = format!(
        "<svg class=\"loss\" data-curve=\"{}\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"training loss of {}\">\n",
        esc(&c.name),
        esc(&c.name)
    );
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"16\" text-anchor=\"middle\" class=\"ptitle\">{}</text>",
        w / 2.0,
        esc(&c.name)
    );
    if pts.is_empty() {
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">no finite loss values</text></svg>",
            w / 2.0,
            h / 2.0
        );
        return s;
    }
    let (mut x0, mut x1) = (pts[0].0, pts[pts.len() - 1].0);
    let (mut y0, mut y1) = pts
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.1), b.max(p.1))
        });
    if x1 <= x0 {
        x0 -= 0.5;
        x1 += 0.5;
    }
    if y1 <= y0 {
        let pad = (y0.abs() * 0.1).max(0.5);
        y0 -= pad;
        y1 += pad;
    }
    let (pw, ph) = (w - ml - mr, h - mt - mb);
    let sx = |x: f64| ml + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| mt + (1.0 - (y - y0) / (y1 - y0)) * ph;
    let _ = writeln!(
        s,
        "<rect x=\"{ml}\" y=\"{mt}\" width=\"{pw}\" height=\"{ph}\" class=\"frame\"/>"
    );
    for i in 0..=4 {
        let f = i as f64 / 4.0;
        let yv = y0 + f * (y1 - y0);
        let y = sy(yv);
        let _ = writeln!(
            s,
            "<line x1=\"{ml}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" class=\"gridline\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" class=\"tick\">{}</text>",
            ml + pw,
            ml - 4.0,
            y + 4.0,
            axis_num(yv)
        );
        let xv = x0 + f * (x1 - x0);
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\" class=\"tick\">{}</text>",
            sx(xv),
            mt + ph + 14.0,
            axis_num(xv.round())
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" class=\"axis\">step</text>",
        ml + pw / 2.0,
        h - 4.0
    );
    let poly = |p: &[(f64, f64)]| {
        p.iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let _ = writeln!(s, "<polyline class=\"raw\" points=\"{}\"/>", poly(&pts));
    let win = (pts.len() / 20).max(1);
    if win > 1 {
        let _ = writeln!(
            s,
            "<polyline class=\"avg\" points=\"{}\"/>",
            poly(&moving_average(&pts, win))
        );
    }
    s.push_str("</svg>\n");
    s
}

const STYLE: &str = "
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fff}
h1{margin-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0 1.4em}
th,td{border:1px solid #ccc;padding:.3em .5em;text-align:center;vertical-align:middle}
thead th{background:#f2f2f2}
td.best{background:#e3f4e3}
td.best strong{font-weight:700}
td.missing{color:#999}
.ci{color:#666;font-size:.85em}
.meancol{border-left:2px solid #888}
td.prompt{text-align:left;max-width:22em;font-size:.9em}
table.grid img{width:160px;height:auto;image-rendering:auto;display:block}
.plots{display:flex;flex-wrap:wrap;gap:1em}
svg.loss{background:#fff;border:1px solid #ddd}
svg.loss .frame{fill:none;stroke:#999}
svg.loss .gridline{stroke:#eee}
svg.loss .tick{font-size:10px;fill:#555}
svg.loss .axis,svg.loss .ptitle{font-size:12px;fill:#333}
svg.loss .raw{fill:none;stroke:#9ab;stroke-width:1}
svg.loss .avg{fill:none;stroke:#c33;stroke-width:2}
pre{background:#f7f7f7;border:1px solid #ddd;padding:1em;overflow:auto}
";

/// Counts loaded images into `<body data-images-loaded data-images-total>`.
const SCRIPT: &str = "
window.addEventListener('load', function () {
  var imgs = document.images, loaded = 0;
  for (var i = 0; i < imgs.length; i++) {
    if (imgs[i].complete && imgs[i].naturalWidth > 0) loaded++;
  }
  document.body.dataset.imagesLoaded = String(loaded);
  document.body.dataset.imagesTotal = String(imgs.length);
});
";

/// The whole page.
pub fn render(input: &ReportInput) -> Result<String> {
    let r = &input.results;
    let mut o = String::new();
    o.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    o.push_str("<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'\">\n");
    o.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    let _ = writeln!(o, "<title>{}</title>", esc(&input.title));
    let _ = writeln!(
        o,
        "<style>{STYLE}{}</style>\n</head>\n<body>",
        super::chart::STYLE
    );
    let _ = writeln!(o, "<h1>{}</h1>", esc(&input.title));
    if !input.notes.is_empty() {
        o.push_str("<ul class=\"notes\">\n");
        for n in &input.notes {
            let _ = writeln!(o, "<li>{}</li>", esc(n));
        }
        o.push_str("</ul>\n");
    }
    o.push_str("<nav><a href=\"#results-section\">results</a> &middot; <a href=\"#grids\">images</a> &middot; <a href=\"#loss\">training loss</a> &middot; <a href=\"#config\">config</a></nav>\n");
    o.push_str("<h2 id=\"results-section\">Results</h2>\n");
    let _ = writeln!(
        o,
        "<p>Mean score per variant, skill and scorer over held-out prompts, with its 95% interval \
         in brackets (Student t; Wilson for pass/fail scores). Higher is better; the best value \
         of each column is <strong>bold</strong> on a green background. {} variants, {} skills, {} scorers.</p>",
        r.variants.len(),
        r.skills.len(),
        r.scorers.len()
    );
    if r.variants.is_empty() || r.skills.is_empty() || r.scorers.is_empty() {
        o.push_str("<p class=\"missing\">No evaluation results.</p>\n");
    } else {
        results_table(&mut o, r);
        // One bar chart per skill for the first scorer: mean and interval
        // per variant, the base's mean dashed.
        let scorer = &r.scorers[0];
        let _ = writeln!(
            o,
            "<p>{}: mean per variant with its 95% interval; the dashed line is the base.</p>\n<div class=\"plots charts\">",
            esc(scorer)
        );
        for skill in &r.skills {
            o.push_str(&super::chart::bars_svg(r, skill, scorer));
        }
        o.push_str("</div>\n");
    }
    for t in &r.extra {
        extra_table(&mut o, t);
    }
    o.push_str("<h2 id=\"grids\">Images</h2>\n<p>One image per held-out prompt and seed; the same prompt and seed across variants.</p>\n");
    if input.grids.is_empty() {
        o.push_str("<p class=\"missing\">No images.</p>\n");
    }
    for g in &input.grids {
        grid_html(&mut o, g, &r.variants)?;
    }
    o.push_str("<h2 id=\"loss\">Training loss</h2>\n");
    if input.loss_curves.is_empty() {
        o.push_str("<p class=\"missing\">No loss logs.</p>\n");
    } else {
        o.push_str("<p>Per-step training loss (light) and its moving average (red).</p>\n<div class=\"plots\">\n");
        for c in &input.loss_curves {
            o.push_str(&loss_svg(c));
        }
        o.push_str("</div>\n");
    }
    o.push_str("<h2 id=\"config\">Configuration</h2>\n");
    let _ = writeln!(o, "<pre class=\"config\">{}</pre>", esc(&input.config_toml));
    let _ = writeln!(o, "<script>{SCRIPT}</script>\n</body>\n</html>");
    Ok(o)
}
