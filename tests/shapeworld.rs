//! End-to-end tests of ShapeWorld (issue 6, must-show 1): scenes rendered
//! by the real `selma shapeworld render`, checked by the bundled
//! `shapeworld-verifier` image-filter plugin through the runtime. The
//! verifier only sees pixels and caption text; the ground truth of every
//! (mutated) caption comes from the scene model in metadata.jsonl.

use crate::support;

use selma_runtime::{ImageFilterPlugin, RgbImage, Runtime, RuntimeConfig};
use selma_shapeworld::{read_png, Caption, Color, Form, MetaLine, Relation, Shape};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Instant;
use support::root;

/// The real binary, with its component cache inside target/.
fn selma() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_selma"));
    c.env("SELMA_CACHE_DIR", root().join("target/selma-test-cache"));
    c
}

fn run_ok(c: &mut Command) -> String {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{:?} failed:\n{}",
        c,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn render(out: &Path, count: usize, seed: u64, extra: &[&str]) -> String {
    run_ok(
        selma()
            .args(["shapeworld", "render", "--count"])
            .arg(count.to_string())
            .args(["--seed", &seed.to_string(), "--out"])
            .arg(out)
            .args(extra),
    )
}

fn read_meta(dir: &Path) -> Vec<MetaLine> {
    std::fs::read_to_string(dir.join("metadata.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn verifier() -> (Runtime, ImageFilterPlugin) {
    let rt = Runtime::new(RuntimeConfig {
        cache_dir: Some(root().join("target/selma-test-cache")),
        log_to_stderr: false,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let f = rt.image_filter("shapeworld-verifier").unwrap();
    (rt, f)
}

fn image(dir: &Path, line: &MetaLine) -> RgbImage {
    let (width, height, pixels) = read_png(&dir.join(&line.file_name)).unwrap();
    RgbImage {
        width,
        height,
        pixels,
        non_finite: 0.0,
    }
}

fn other_color(c: Color, k: usize) -> Color {
    let i = Color::ALL.iter().position(|x| *x == c).unwrap();
    Color::ALL[(i + k) % 4]
}

fn other_shape(s: Shape, k: usize) -> Shape {
    let i = Shape::ALL.iter().position(|x| *x == s).unwrap();
    Shape::ALL[(i + k) % 3]
}

/// Wrong-looking variants of `c`, each tagged with what was changed; only
/// captions of the grammar (two objects of a binding/spatial caption differ).
fn mutations(c: &Caption, index: usize) -> Vec<(&'static str, Caption)> {
    let k3 = 1 + index % 3; // a different colour
    let k2 = 1 + index % 2; // a different shape
    let mut out = Vec::new();
    let two = |a: (Color, Shape), b: (Color, Shape)| a != b;
    match *c {
        Caption::Single { color, shape } => {
            out.push((
                "colour",
                Caption::Single {
                    color: other_color(color, k3),
                    shape,
                },
            ));
            out.push((
                "shape",
                Caption::Single {
                    color,
                    shape: other_shape(shape, k2),
                },
            ));
            out.push(("count", Caption::Count { n: 2, color, shape }));
        }
        Caption::Count { n, color, shape } => {
            out.push((
                "colour",
                Caption::Count {
                    n,
                    color: other_color(color, k3),
                    shape,
                },
            ));
            out.push((
                "shape",
                Caption::Count {
                    n,
                    color,
                    shape: other_shape(shape, k2),
                },
            ));
            for m in [n - 1, n + 1] {
                if (1..=4).contains(&m) {
                    out.push(("count", Caption::Count { n: m, color, shape }));
                }
            }
        }
        Caption::Plural { color, shape } => {
            out.push((
                "colour",
                Caption::Plural {
                    color: other_color(color, k3),
                    shape,
                },
            ));
            out.push((
                "shape",
                Caption::Plural {
                    color,
                    shape: other_shape(shape, k2),
                },
            ));
        }
        Caption::Binding { a, b } => {
            let a2 = (other_color(a.0, k3), a.1);
            if two(a2, b) {
                out.push(("colour", Caption::Binding { a: a2, b }));
            }
            let b2 = (b.0, other_shape(b.1, k2));
            if two(a, b2) {
                out.push(("shape", Caption::Binding { a, b: b2 }));
            }
            // Attribute binding: the colours trade places.
            let (sa, sb) = ((b.0, a.1), (a.0, b.1));
            if two(sa, sb) && (sa, sb) != (a, b) && (sa, sb) != (b, a) {
                out.push(("binding swap", Caption::Binding { a: sa, b: sb }));
            }
        }
        Caption::Spatial { a, rel, b } => {
            let a2 = (other_color(a.0, k3), a.1);
            if two(a2, b) {
                out.push(("colour", Caption::Spatial { a: a2, rel, b }));
            }
            let b2 = (b.0, other_shape(b.1, k2));
            if two(a, b2) {
                out.push(("shape", Caption::Spatial { a, rel, b: b2 }));
            }
            for r in Relation::ALL.into_iter().filter(|r| *r != rel) {
                out.push(("relation", Caption::Spatial { a, rel: r, b }));
            }
            out.push(("objects swapped", Caption::Spatial { a: b, rel, b: a }));
        }
    }
    out
}

#[derive(Default)]
struct Tally {
    n: usize,
    accepted: usize,
}

#[test]
fn verifier_agrees_with_the_renderer_and_rejects_wrong_captions() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("sw");
    // 2500 scenes, all five forms equally: about 500 of each.
    let msg = render(
        &out,
        2500,
        2026,
        &[
            "--mix",
            "single=1,count=1,binding=1,spatial=1,plural=1",
            "--number-word-keep",
            "1",
        ],
    );
    assert!(msg.contains("wrote 2500 scenes"), "{msg}");
    let lines = read_meta(&out);
    assert_eq!(lines.len(), 2500);
    let (_rt, mut f) = verifier();
    let params = f.default_params();

    // 1. Own captions: agreement per form.
    let mut own: BTreeMap<String, Tally> = BTreeMap::new();
    let mut disagreements = Vec::new();
    let t = Instant::now();
    for l in &lines {
        let v = f.check(&image(&out, l), &l.text, &params).unwrap();
        let e = own.entry(l.skill.clone()).or_default();
        e.n += 1;
        if v.keep {
            e.accepted += 1;
            assert_eq!(v.score, 1.0);
        } else {
            disagreements.push(format!("{} \"{}\": {:?}", l.file_name, l.text, v.reason));
        }
    }
    let per_check = t.elapsed().as_secs_f64() / lines.len() as f64;
    println!("own captions (verifier accepts / scenes):");
    for (form, t) in &own {
        println!(
            "  {form:8} {}/{} = {:.2}%",
            t.accepted,
            t.n,
            100.0 * t.accepted as f64 / t.n as f64
        );
    }
    let total: usize = own.values().map(|t| t.accepted).sum();
    println!(
        "  all      {total}/{} = {:.2}%  (about {:.0} us per check incl. PNG decode, debug build)",
        lines.len(),
        100.0 * total as f64 / lines.len() as f64,
        per_check * 1e6
    );
    for d in disagreements.iter().take(10) {
        println!("  disagreement: {d}");
    }
    assert_eq!(own.len(), 5, "every form rendered");
    for (form, t) in &own {
        assert!(t.n >= 400, "{form}: only {} scenes", t.n);
        assert!(
            t.accepted as f64 >= 0.99 * t.n as f64,
            "{form}: agreement {}/{} below 99%: {disagreements:#?}",
            t.accepted,
            t.n
        );
    }

    // 2. Mismatched captions. Ground truth from the scene model: a mutated
    // caption that is still true (e.g. "above" when the pair is also
    // diagonal) must be accepted; a false one must be rejected.
    let mut wrong: BTreeMap<&str, Tally> = BTreeMap::new();
    let mut still_true: BTreeMap<&str, Tally> = BTreeMap::new();
    let mut false_accepts = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let caption = Caption::parse(&l.text).unwrap();
        let img = image(&out, l);
        for (what, m) in mutations(&caption, i) {
            let v = f.check(&img, &m.text(), &params).unwrap();
            let truth = m.holds(&l.scene);
            let e = if truth {
                still_true.entry(what).or_default()
            } else {
                wrong.entry(what).or_default()
            };
            e.n += 1;
            if v.keep {
                e.accepted += 1;
                if !truth {
                    false_accepts.push(format!("{} \"{}\" -> \"{m}\"", l.file_name, l.text));
                }
            }
        }
    }
    println!("mismatched captions that are false (verifier accepts / captions):");
    for (what, t) in &wrong {
        println!(
            "  {what:16} {}/{} = {:.2}%",
            t.accepted,
            t.n,
            100.0 * t.accepted as f64 / t.n as f64
        );
    }
    println!("mutated captions that are still true of the scene (accepts / captions):");
    for (what, t) in &still_true {
        println!("  {what:16} {}/{}", t.accepted, t.n);
    }
    for fa in false_accepts.iter().take(10) {
        println!("  false accept: {fa}");
    }
    for kind in [
        "colour",
        "shape",
        "count",
        "relation",
        "binding swap",
        "objects swapped",
    ] {
        let t = &wrong[kind];
        assert!(t.n >= 100, "{kind}: only {} mismatched captions", t.n);
        // Bound: at most 1% wrong accepts per kind of mismatch.
        assert!(
            t.accepted as f64 <= 0.01 * t.n as f64,
            "{kind}: accepts {}/{} wrong captions: {false_accepts:#?}",
            t.accepted,
            t.n
        );
    }
    for (what, t) in &still_true {
        assert!(
            t.accepted as f64 >= 0.99 * t.n as f64,
            "{what}: rejects true captions ({}/{})",
            t.accepted,
            t.n
        );
    }
}

#[test]
fn render_is_reproducible_and_follows_the_options() {
    let d = tempfile::tempdir().unwrap();
    let (a, b, c) = (d.path().join("a"), d.path().join("b"), d.path().join("c"));
    render(&a, 300, 5, &["--threads", "1"]);
    render(&b, 300, 5, &["--threads", "2"]);
    render(&c, 300, 6, &[]);
    let meta = |p: &Path| std::fs::read(p.join("metadata.jsonl")).unwrap();
    assert_eq!(meta(&a), meta(&b));
    assert_ne!(meta(&a), meta(&c));
    let lines = read_meta(&a);
    for l in &lines {
        assert_eq!(
            std::fs::read(a.join(&l.file_name)).unwrap(),
            std::fs::read(b.join(&l.file_name)).unwrap()
        );
        // Every caption is of the grammar, true of its scene, and the
        // pixels are the scene.
        let cap = Caption::parse(&l.text).unwrap();
        assert!(cap.holds(&l.scene), "{l:?}");
        assert_eq!(read_png(&a.join(&l.file_name)).unwrap().2, l.scene.render());
    }
    // Default mix: no plural scenes except count scenes of 3-4 objects
    // that lost their number word.
    for l in &lines {
        if l.skill == "plural" {
            assert!(l.scene.objects.len() >= 3, "{l:?}");
        }
    }

    // --number-word-keep 0: never a number word for 3-4 objects; 1: always.
    let only_count = ["--mix", "count=1", "--number-word-keep"];
    let k0 = d.path().join("k0");
    let k1 = d.path().join("k1");
    render(&k0, 400, 1, &[&only_count[..], &["0"]].concat());
    render(&k1, 400, 1, &[&only_count[..], &["1"]].concat());
    for l in read_meta(&k0) {
        let big = l.scene.objects.len() >= 3;
        assert_eq!(l.skill == "plural", big, "{l:?}");
    }
    for l in read_meta(&k1) {
        assert_eq!(l.skill, "count", "{l:?}");
    }

    // Errors name the problem and what to do.
    let out = selma()
        .args(["shapeworld", "render", "--count", "3", "--out"])
        .arg(&a)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--overwrite"),
        "{err}"
    );
    let out = selma()
        .args([
            "shapeworld",
            "render",
            "--count",
            "3",
            "--mix",
            "cubes=1",
            "--out",
        ])
        .arg(d.path().join("z"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("cubes"), "{err}");
}

/// World v2 (`--world v2`): the same scenes as v1, captioned in alt-text
/// style; every scene's detailed caption is in metadata.jsonl, the verifier
/// accepts it on every rendered image, and the alt-text caption (which
/// leaves things out) is what the model trains on.
#[test]
fn world_v2_renders_v1_scenes_with_alt_text_captions_the_verifier_agrees_with() {
    let d = tempfile::tempdir().unwrap();
    let (v1, v2) = (d.path().join("v1"), d.path().join("v2"));
    render(&v1, 1200, 31, &["--number-word-keep", "1"]);
    let msg = render(&v2, 1200, 31, &["--world", "v2"]);
    assert!(msg.contains("wrote 1200 scenes"), "{msg}");
    let (a, b) = (read_meta(&v1), read_meta(&v2));
    let (_rt, mut f) = verifier();
    let params = f.default_params();
    let (mut rejected, mut said_all) = (vec![], 0);
    for (l1, l2) in a.iter().zip(&b) {
        assert_eq!(l1.scene, l2.scene, "{}", l2.file_name);
        assert_eq!(l1.skill, l2.skill);
        assert_eq!(l1.detailed, None, "v1 captions are the grammar's");
        let detailed = l2
            .detailed
            .as_deref()
            .expect("v2 lines hold the detailed caption");
        assert_eq!(
            detailed, l1.text,
            "the detailed caption is v1's full caption"
        );
        assert_eq!(
            std::fs::read(v1.join(&l1.file_name)).unwrap(),
            std::fs::read(v2.join(&l2.file_name)).unwrap()
        );
        let v = f.check(&image(&v2, l2), detailed, &params).unwrap();
        if !v.keep {
            rejected.push(format!("{} \"{detailed}\": {:?}", l2.file_name, v.reason));
        }
        said_all += usize::from(l2.text == detailed);
    }
    assert!(rejected.is_empty(), "verifier disagrees: {rejected:?}");
    // Alt-text leaves things out: most captions are not the detailed one.
    let share = said_all as f64 / b.len() as f64;
    println!(
        "v2: {said_all}/{} alt-text captions state the whole scene",
        b.len()
    );
    assert!((0.05..0.35).contains(&share), "{share}");

    // Knobs of the other world are errors that say which world has them.
    for (args, want) in [
        (
            &["--world", "v2", "--number-word-keep", "0.5"][..],
            "--alt-text number",
        ),
        (&["--alt-text", "color=0.5"][..], "--world v2"),
        (&["--world", "v2", "--alt-text", "colour=0.5"][..], "colour"),
        (&["--world", "v2", "--alt-text", "number=2"][..], "number"),
        (&["--world", "v3"][..], "v3"),
    ] {
        let out = selma()
            .args(["shapeworld", "render", "--count", "3", "--out"])
            .arg(d.path().join("bad"))
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn prompts_are_seeded_captions_of_one_form() {
    let draw = |skill: &str, seed: &str| {
        run_ok(selma().args([
            "shapeworld",
            "prompts",
            "--skill",
            skill,
            "--count",
            "200",
            "--seed",
            seed,
        ]))
    };
    for (skill, form) in [
        ("single", Form::Single),
        ("sw-counting", Form::Count),
        ("binding", Form::Binding),
        ("spatial", Form::Spatial),
    ] {
        let text = draw(skill, "7");
        assert_eq!(text, draw(skill, "7"));
        assert_ne!(text, draw(skill, "8"));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 200);
        for l in lines {
            assert_eq!(Caption::parse(l).unwrap().form(), form, "{l}");
        }
    }
}

#[test]
fn verifier_reports_unparseable_captions_by_name() {
    let (_rt, mut f) = verifier();
    let params = f.default_params();
    let img = RgbImage {
        width: 32,
        height: 32,
        pixels: vec![240; 32 * 32 * 3],
        non_finite: 0.0,
    };
    let e = f
        .check(&img, "a purple dragon", &params)
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"a purple dragon\""), "{e}");
    // An empty image has no objects: the caption's checks fail.
    let v = f.check(&img, "a red circle", &params).unwrap();
    assert!(!v.keep && v.score == 0.0, "{v:?}");
    // Template-style capitalisation is accepted.
    let e = f.check(&img, "Three red circles", &params).unwrap();
    assert!(!e.keep);
}

#[test]
fn sw_skills_reach_exactly_the_grammar_through_the_template_generator() {
    let d = tempfile::tempdir().unwrap();
    let (rt, _) = verifier();
    for (skill, form) in [
        ("sw-single", Form::Single),
        ("sw-counting", Form::Count),
        ("sw-binding", Form::Binding),
        ("sw-spatial", Form::Spatial),
    ] {
        let want: std::collections::BTreeSet<String> =
            Caption::all(form).iter().map(|c| c.text()).collect();
        let seeds = rt.skill(skill).unwrap().info().unwrap().seeds;
        let out = d.path().join(format!("{skill}.jsonl"));
        run_ok(
            selma()
                .args(["prompts", "--skill", skill, "--generator", "template"])
                .args(["--count", &(want.len() - seeds.len()).to_string()])
                .args(["--seed", "3", "--allow-partial", "-q", "--out"])
                .arg(&out),
        );
        let mut got: std::collections::BTreeSet<String> =
            seeds.iter().map(|s| s.to_lowercase()).collect();
        for line in std::fs::read_to_string(&out).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let text = v["text"].as_str().unwrap();
            // The SDK's template expansion capitalises the first letter.
            assert_eq!(Caption::parse(text).unwrap().form(), form, "{text}");
            assert!(got.insert(text.to_lowercase()), "duplicate {text}");
        }
        assert_eq!(got, want, "{skill}");
    }
}
