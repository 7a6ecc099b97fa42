//! Unit tests of the report renderer, loss-log reader and atomic writer.

use super::html::{base64, esc, sniff_mime};
use super::*;
use crate::eval::results::{Cell, Results, Table};

fn cell(variant: &str, skill: &str, scorer: &str, mean: f64) -> Cell {
    Cell {
        variant: variant.into(),
        skill: skill.into(),
        scorer: scorer.into(),
        mean,
        lo: mean - 0.05,
        hi: mean + 0.05,
        n: 4,
    }
}

/// A 2x2 RGB PNG written with the `png` crate.
fn write_png(path: &Path, rgb: [u8; 3]) {
    let f = std::fs::File::create(path).unwrap();
    let mut enc = png::Encoder::new(std::io::BufWriter::new(f), 2, 2);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().unwrap();
    let data: Vec<u8> = (0..4).flat_map(|_| rgb).collect();
    w.write_image_data(&data).unwrap();
}

fn input(dir: &Path) -> ReportInput {
    let results = Results {
        variants: vec![
            "base".into(),
            "expert:counting".into(),
            "merged:linear".into(),
        ],
        skills: vec!["counting".into(), "general".into()],
        scorers: vec!["degenerate".into()],
        cells: vec![
            cell("base", "counting", "degenerate", 0.5),
            cell("base", "general", "degenerate", 0.9),
            cell("expert:counting", "counting", "degenerate", 0.7),
            cell("expert:counting", "general", "degenerate", 0.6),
            cell("merged:linear", "counting", "degenerate", 0.6),
            cell("merged:linear", "general", "degenerate", 0.8),
        ],
        extra: vec![Table {
            title: "self-generation <pass> rate".into(),
            header: vec!["skill".into(), "kept".into()],
            rows: vec![vec!["counting".into(), "3/4".into()]],
        }],
    };
    let a = dir.join("a.png");
    let b = dir.join("b.png");
    write_png(&a, [255, 0, 0]);
    write_png(&b, [0, 0, 255]);
    ReportInput {
        title: "run <tiny> & co".into(),
        results,
        grids: vec![Grid {
            skill: "counting".into(),
            rows: vec![GridRow {
                prompt: "two \"red\" <cubes>".into(),
                seed: 7,
                images: vec![("merged:linear".into(), b), ("base".into(), a)],
            }],
        }],
        loss_curves: vec![LossCurve {
            name: "expert:counting".into(),
            points: (0..50).map(|i| (i, 1.0 / (1.0 + i as f64))).collect(),
        }],
        config_toml: "[llm]\nurl = \"http://localhost:8000/v1\" # <not> a resource\n".into(),
        notes: vec!["pictures of the tiny model are noise".into()],
    }
}

#[test]
fn base64_matches_rfc4648_vectors() {
    let cases = [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ];
    for (i, o) in cases {
        assert_eq!(base64(i.as_bytes()), o, "{i:?}");
    }
    assert_eq!(base64(&[0xFB, 0xFF, 0xBF]), "+/+/");
}

#[test]
fn escaping_covers_markup_characters() {
    assert_eq!(
        esc("<a href='x'>\"&\"</a>"),
        "&lt;a href=&#39;x&#39;&gt;&quot;&amp;&quot;&lt;/a&gt;"
    );
}

#[test]
fn mime_sniffing() {
    assert_eq!(sniff_mime(b"\x89PNG\r\n\x1a\nrest"), Some("image/png"));
    assert_eq!(sniff_mime(&[0xFF, 0xD8, 0xFF, 0xE0]), Some("image/jpeg"));
    assert_eq!(sniff_mime(b"RIFF\0\0\0\0WEBPVP8 "), Some("image/webp"));
    assert_eq!(sniff_mime(b"GIF89a"), None);
}

#[test]
fn render_marks_best_per_column_and_inlines_images() {
    let dir = tempfile::tempdir().unwrap();
    let html = render(&input(dir.path())).unwrap();
    // best per column: counting -> expert (0.700), general -> base (0.900),
    // mean over skills: base (0.7) vs expert (0.65) vs merged (0.7): a tie
    assert!(html.contains(
        "<td class=\"best\" data-skill=\"counting\" data-scorer=\"degenerate\" title=\"n = 4\"><strong>0.700</strong> <span class=\"ci\">[0.650, 0.750]</span></td>"
    ), "{html}");
    assert!(html.contains(
        "<td class=\"best\" data-skill=\"general\" data-scorer=\"degenerate\" title=\"n = 4\"><strong>0.900</strong>"
    ));
    assert!(html.contains(
        "<td class=\"val\" data-skill=\"counting\" data-scorer=\"degenerate\" title=\"n = 4\">0.500 <span class=\"ci\">[0.450, 0.550]</span></td>"
    ));
    assert_eq!(
        html.matches("<td class=\"best").count(),
        4,
        "2 skill columns + a tie of 2 in the mean column"
    );
    assert_eq!(html.matches("class=\"best meancol\"").count(), 2);
    // text is escaped everywhere
    assert!(html.contains("<title>run &lt;tiny&gt; &amp; co</title>"));
    assert!(html.contains("two &quot;red&quot; &lt;cubes&gt;"));
    assert!(html.contains("self-generation &lt;pass&gt; rate"));
    assert!(html.contains("# &lt;not&gt; a resource"));
    assert!(!html.contains("<cubes>") && !html.contains("<not>"));
    // grid columns follow the results' variant order: base before merged
    let a = html.find("alt=\"base: ").unwrap();
    let b = html.find("alt=\"merged:linear: ").unwrap();
    assert!(a < b);
    // images are the exact file bytes as data: URIs
    let bytes = std::fs::read(dir.path().join("a.png")).unwrap();
    assert!(html.contains(&format!("src=\"data:image/png;base64,{}\"", base64(&bytes))));
    assert_eq!(html.matches("<img ").count(), 2);
    // one loss plot with raw and averaged lines
    assert_eq!(html.matches("<svg class=\"loss\"").count(), 1);
    assert!(html.contains("<polyline class=\"raw\"") && html.contains("<polyline class=\"avg\""));
    // no external references of any kind
    for attr in ["src=\"", "href=\""] {
        for (i, _) in html.match_indices(attr) {
            let v = &html[i + attr.len()..];
            assert!(
                v.starts_with("data:") || v.starts_with('#'),
                "{}",
                &v[..40.min(v.len())]
            );
        }
    }
}

#[test]
fn missing_image_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut inp = input(dir.path());
    inp.grids[0].rows[0].images[0].1 = dir.path().join("gone.png");
    let e = format!("{:#}", render(&inp).unwrap_err());
    assert!(e.contains("gone.png"), "{e}");
}

#[test]
fn large_images_become_jpeg_thumbnails() {
    let dir = tempfile::tempdir().unwrap();
    // 400x400 noise: a PNG far above the inline limit
    let mut state = 12345u32;
    let px: Vec<u8> = (0..400 * 400 * 3)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 24) as u8
        })
        .collect();
    let p = dir.path().join("big.png");
    image::RgbImage::from_raw(400, 400, px)
        .unwrap()
        .save(&p)
        .unwrap();
    assert!(std::fs::metadata(&p).unwrap().len() > 300_000);
    let uri = html::image_data_uri(&p).unwrap();
    let b64 = uri.strip_prefix("data:image/jpeg;base64,").unwrap();
    assert!(b64.len() < 400_000);
    let bytes = decode_b64(b64);
    let img = image::load_from_memory(&bytes).unwrap();
    assert_eq!((img.width(), img.height()), (384, 384));
}

/// Test-only base64 decoder (to check the encoder round-trips).
fn decode_b64(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => 0,
        }
    };
    let mut out = vec![];
    for ch in s.as_bytes().chunks(4) {
        let n = ch.iter().fold(0u32, |a, &c| a << 6 | val(c));
        let pad = ch.iter().filter(|&&c| c == b'=').count();
        let b = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&b[..3 - pad]);
    }
    out
}

#[test]
fn base64_round_trips_all_lengths() {
    let data: Vec<u8> = (0..=255u8).collect();
    for n in 0..40 {
        assert_eq!(decode_b64(&base64(&data[..n])), &data[..n]);
    }
    assert_eq!(decode_b64(&base64(&data)), data);
}

#[test]
fn loss_log_reading() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("loss.jsonl");
    std::fs::write(
        &p,
        "{\"step\":1,\"loss\":0.5,\"lr\":0.0003}\n\n{\"step\":2,\"loss\":null}\n{\"step\":3,\"loss\":0.25}\n{\"step\":4,\"lo",
    )
    .unwrap();
    assert_eq!(read_loss_log(&p).unwrap(), vec![(1, 0.5), (3, 0.25)]);
    std::fs::write(
        &p,
        "{\"step\":1,\"loss\":0.5}\n{\"step\":\"x\",\"loss\":1}\n",
    )
    .unwrap();
    let e = format!("{:#}", read_loss_log(&p).unwrap_err());
    assert!(e.contains("loss.jsonl:2") && e.contains("step"), "{e}");
    // a broken line that is not the last is an error too
    std::fs::write(&p, "{\"step\":1,\n{\"step\":2,\"loss\":1}\n").unwrap();
    let e = format!("{:#}", read_loss_log(&p).unwrap_err());
    assert!(e.contains("loss.jsonl:1"), "{e}");
}

#[test]
fn loss_plot_maps_extremes_to_the_frame() {
    let c = LossCurve {
        name: "joint".into(),
        points: vec![(0, 2.0), (10, 1.0), (20, 0.0)],
    };
    let svg = html::loss_svg(&c);
    // plot area: x 62..426, y 26..212 (440x250 minus margins)
    assert!(
        svg.contains("points=\"62.0,26.0 244.0,119.0 426.0,212.0\""),
        "{svg}"
    );
    let empty = html::loss_svg(&LossCurve {
        name: "x".into(),
        points: vec![(0, f64::NAN)],
    });
    assert!(empty.contains("no finite loss values"));
}

#[test]
fn write_is_atomic_and_leaves_no_temp() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("sub").join("report.html");
    write(&p, &input(dir.path())).unwrap();
    let html = std::fs::read_to_string(&p).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    let names: Vec<_> = std::fs::read_dir(p.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["report.html".to_string()]);
}

/// The attribute `name` of an SVG element's text.
fn attr(el: &str, name: &str) -> f64 {
    let key = format!(" {name}=\"");
    let at = el.find(&key).unwrap_or_else(|| panic!("no {name} in {el}")) + key.len();
    el[at..].split('"').next().unwrap().parse().unwrap()
}

#[test]
fn bar_charts_show_each_variant_at_its_mean_with_its_interval() {
    let dir = tempfile::tempdir().unwrap();
    let inp = input(dir.path());
    let html = render(&inp).unwrap();
    // One chart per skill, for the first scorer.
    assert_eq!(html.matches("<svg class=\"bars\"").count(), 2);
    for skill in ["counting", "general"] {
        let start = html
            .find(&format!("<svg class=\"bars\" data-skill=\"{skill}\""))
            .unwrap();
        let svg = &html[start..start + html[start..].find("</svg>").unwrap()];
        let bars: Vec<&str> = svg.split("<rect ").skip(1).collect();
        assert_eq!(bars.len(), 3, "{svg}");
        let floor = attr(bars[0], "y") + attr(bars[0], "height");
        let mut full = None;
        for (bar, v) in bars.iter().zip(&inp.results.variants) {
            let c = inp.results.cell(v, skill, "degenerate").unwrap();
            assert!(bar.contains(&format!("data-variant=\"{v}\"")));
            assert_eq!(attr(bar, "data-mean"), c.mean);
            // Bars stand on one floor, heights proportional to the means (axis 0..1).
            assert!((attr(bar, "y") + attr(bar, "height") - floor).abs() < 0.2);
            let per_unit = attr(bar, "height") / c.mean;
            let f = *full.get_or_insert(per_unit);
            assert!((per_unit - f).abs() < 0.5, "{per_unit} vs {f}");
        }
        let f = full.unwrap();
        // Whiskers run from lo to hi; the dashed line sits at the base's mean.
        for (w, v) in svg
            .split("class=\"whisker\" d=\"M")
            .skip(1)
            .zip(&inp.results.variants)
        {
            let c = inp.results.cell(v, skill, "degenerate").unwrap();
            let nums: Vec<f64> = w
                .split(|ch: char| !(ch.is_ascii_digit() || ch == '.'))
                .filter(|t| !t.is_empty())
                .take(3)
                .map(|t| t.parse().unwrap())
                .collect();
            assert!((floor - nums[1] - c.lo * f).abs() < 0.3, "lo of {v}: {w}");
            assert!((floor - nums[2] - c.hi * f).abs() < 0.3, "hi of {v}: {w}");
        }
        let base = inp.results.cell("base", skill, "degenerate").unwrap().mean;
        let line = &svg[svg.find("class=\"baseline\"").unwrap()..];
        assert!((floor - attr(line, "y1") - base * f).abs() < 0.2);
    }
}
