//! Must-show 5: the report opens in a real headless browser (Debian's
//! chromium), offline, and shows the results table with every variant and
//! skill and every image it references, loaded; it references nothing over
//! http(s). Needs `/usr/bin/chromium` (`apt-get install -y chromium`; `.ci/run`
//! installs it): without it the test fails and says so.

use crate::support;

use selma::eval::report::{self, Grid, GridRow, LossCurve, ReportInput};
use selma::eval::{Cell, Results, Table};
use std::path::{Path, PathBuf};
use support::browser::{body_attr, dump_dom, references};

const VARIANTS: [&str; 4] = ["base", "expert:counting", "joint", "merged:linear"];
const SKILLS: [&str; 2] = ["counting", "spatial <relations>"];
const SCORERS: [&str; 2] = ["degenerate", "clipscore"];

/// A small RGB PNG: a colour gradient distinct per (variant, row).
fn write_png(path: &Path, w: u32, h: u32, tint: u8) {
    let px: Vec<u8> = (0..w * h)
        .flat_map(|i| {
            let (x, y) = (i % w, i / w);
            [tint, (x * 255 / w) as u8, (y * 255 / h) as u8]
        })
        .collect();
    image::RgbImage::from_raw(w, h, px)
        .unwrap()
        .save_with_format(path, image::ImageFormat::Png)
        .unwrap();
}

fn write_jpeg(path: &Path, w: u32, h: u32) {
    let px: Vec<u8> = (0..w * h * 3).map(|i| (i % 251) as u8).collect();
    image::RgbImage::from_raw(w, h, px)
        .unwrap()
        .save_with_format(path, image::ImageFormat::Jpeg)
        .unwrap();
}

/// A report over 4 variants x 2 skills x 2 scorers with 2 prompts per skill:
/// 16 images (one of them a JPEG). Returns the input and the image count.
fn build_input(dir: &Path) -> (ReportInput, usize) {
    let mut cells = vec![];
    for (vi, v) in VARIANTS.iter().enumerate() {
        for (si, s) in SKILLS.iter().enumerate() {
            for (ci, c) in SCORERS.iter().enumerate() {
                let scale = if ci == 1 { 100.0 } else { 1.0 };
                let mean = scale * (0.2 + 0.1 * vi as f64 + 0.05 * si as f64);
                cells.push(Cell {
                    variant: v.to_string(),
                    skill: s.to_string(),
                    scorer: c.to_string(),
                    mean,
                    lo: mean - 0.02 * scale,
                    hi: mean + 0.02 * scale,
                    n: 2,
                });
            }
        }
    }
    let results = Results {
        variants: VARIANTS.iter().map(|s| s.to_string()).collect(),
        skills: SKILLS.iter().map(|s| s.to_string()).collect(),
        scorers: SCORERS.iter().map(|s| s.to_string()).collect(),
        cells,
        extra: vec![Table {
            title: "self-generation pass rate".into(),
            header: vec!["skill".into(), "kept".into(), "total".into()],
            rows: SKILLS
                .iter()
                .map(|s| vec![s.to_string(), "3".into(), "4".into()])
                .collect(),
        }],
    };
    let mut grids = vec![];
    let mut count = 0;
    for (si, s) in SKILLS.iter().enumerate() {
        let mut rows = vec![];
        for p in 0..2u64 {
            let mut images = vec![];
            for (vi, v) in VARIANTS.iter().enumerate() {
                let path = dir.join(format!("s{si}_p{p}_v{vi}.png"));
                if si == 1 && p == 1 && vi == 3 {
                    let path = path.with_extension("jpg");
                    write_jpeg(&path, 24, 16);
                    images.push((v.to_string(), path));
                } else {
                    write_png(
                        &path,
                        16 + 8 * vi as u32,
                        16,
                        (40 * vi + 20 * p as usize) as u8,
                    );
                    images.push((v.to_string(), path));
                }
                count += 1;
            }
            rows.push(GridRow {
                prompt: format!("prompt {p} of {s} with \"quotes\" & <tags>"),
                seed: 1000 + p,
                images,
            });
        }
        grids.push(Grid {
            skill: s.to_string(),
            rows,
        });
    }
    let loss_curves = VARIANTS[1..]
        .iter()
        .map(|v| LossCurve {
            name: v.to_string(),
            points: (0..200)
                .map(|i| (i, 0.2 + 1.0 / (1.0 + i as f64) + 0.01 * (i % 7) as f64))
                .collect(),
        })
        .collect();
    let input = ReportInput {
        title: "selma report test".into(),
        results,
        grids,
        loss_curves,
        config_toml: "[llm]\nendpoint = \"https://api.example.com/v1\"\n".into(),
        notes: vec!["tiny model: the pictures are noise".into()],
    };
    (input, count)
}

fn write_report(dir: &Path, input: &ReportInput) -> PathBuf {
    let page = dir.join("report.html");
    report::write(&page, input).unwrap();
    page
}

#[test]
fn report_opens_in_headless_chromium_with_table_and_all_images() {
    let dir = tempfile::tempdir().unwrap();
    let (input, n_images) = build_input(dir.path());
    assert_eq!(n_images, 16);
    let page = write_report(dir.path(), &input);
    // SELMA_KEEP_REPORT=<file>: keep a copy to look at
    if let Some(keep) = std::env::var_os("SELMA_KEEP_REPORT") {
        std::fs::copy(&page, keep).unwrap();
    }
    // the page must not depend on the image files any more: delete them
    for g in &input.grids {
        for r in &g.rows {
            for (_, p) in &r.images {
                std::fs::remove_file(p).unwrap();
            }
        }
    }
    let dom = dump_dom(&page);

    // the inline script ran after load and found every image decoded
    assert_eq!(
        body_attr(&dom, "data-images-total"),
        Some(n_images),
        "images total; DOM head: {}",
        &dom[..dom.len().min(2000)]
    );
    assert_eq!(body_attr(&dom, "data-images-loaded"), Some(n_images));

    // the results table: one row per variant, every skill and scorer heading
    let table = &dom[dom.find("<table id=\"results\"").expect("results table")..];
    let table = &table[..table.find("</table>").unwrap()];
    for v in VARIANTS {
        assert!(
            table.contains(&format!("<tr data-variant=\"{v}\">")),
            "row for {v}"
        );
    }
    for s in SKILLS {
        let esc = s.replace('<', "&lt;").replace('>', "&gt;");
        assert!(table.contains(&format!(">{esc}</th>")), "skill column {s}");
    }
    for c in SCORERS {
        assert!(table.contains(&format!("<th>{c}</th>")));
    }
    // every variant x skill x scorer cell shows a value, best ones marked:
    // merged:linear (vi = 3) is best in every column
    assert_eq!(
        table.matches("<td class=\"val").count() + table.matches("<td class=\"best").count(),
        4 * (4 + 2)
    );
    let merged = &table[table.find("data-variant=\"merged:linear\"").unwrap()..];
    assert_eq!(merged.matches("<td class=\"best").count(), 6);
    // one grid per skill, one image per variant and row, 4 loss plots
    assert_eq!(dom.matches("<table class=\"grid\"").count(), SKILLS.len());
    assert_eq!(dom.matches("<img ").count(), n_images);
    assert_eq!(dom.matches("<svg class=\"loss\"").count(), 3);
    assert!(dom.contains("<pre class=\"config\">"));

    // offline: every reference is a data: URI or an in-page fragment; the
    // https:// inside the config text is text, not a reference
    let refs = references(&dom);
    assert!(refs.len() >= n_images);
    for r in &refs {
        assert!(
            r.starts_with("data:") || r.starts_with('#'),
            "external reference in the report: {r}"
        );
    }
    assert!(dom.contains("https://api.example.com/v1"));
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(!html.contains("<link") && !html.contains("@import"));
}

/// The negative control: a corrupt image is counted as not loaded, so the
/// check above can fail.
#[test]
fn broken_image_is_detected_by_the_browser_check() {
    let dir = tempfile::tempdir().unwrap();
    let (mut input, n_images) = build_input(dir.path());
    let bad = dir.path().join("bad.png");
    let good = std::fs::read(&input.grids[0].rows[0].images[0].1).unwrap();
    // PNG signature and header intact, pixel data cut off
    std::fs::write(&bad, &good[..40]).unwrap();
    input.grids[0].rows[0].images[0].1 = bad;
    let page = write_report(dir.path(), &input);
    let dom = dump_dom(&page);
    assert_eq!(body_attr(&dom, "data-images-total"), Some(n_images));
    assert_eq!(body_attr(&dom, "data-images-loaded"), Some(n_images - 1));
}
