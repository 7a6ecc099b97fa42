//! The `shapeworld-verifier` image filter: checks a ShapeWorld image against
//! its caption from the pixels alone (it knows nothing of the renderer).
//!
//! 1. Parse the caption (single, count, plural, binding or spatial form).
//! 2. Give each pixel the nearest of five colours (background + palette);
//!    4-connected components of one palette colour with at least
//!    `min-pixels` pixels are objects (smaller ones are noise).
//! 3. Shape of an object from its fill ratio (area / box area) and the
//!    widths of its top and bottom rows; centroid from its pixels.
//! 4. Checks: the object count is right; each object the caption names is
//!    present (one check each); for spatial captions the relation holds.
//!    score = passed / checks, keep = every check passed.

use selma_plugin_sdk::{
    params, Image, ImageFilter, ImageVerdict, Metadata, Params, Plugin, PluginKind,
};

/// Background colour.
pub const BACKGROUND: [u8; 3] = [240, 240, 240];
/// Palette colours and their caption words.
pub const PALETTE: [(&str, [u8; 3]); 4] = [
    ("red", [220, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [40, 80, 220]),
    ("yellow", [230, 200, 40]),
];
const NUMBERS: [&str; 4] = ["one", "two", "three", "four"];

/// A shape the verifier can tell apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Disc.
    Circle,
    /// Filled square.
    Square,
    /// Upward triangle.
    Triangle,
}

impl Shape {
    const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];

    fn word(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }
}

/// A (colour, shape) pair; colour is an index into [`PALETTE`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kind {
    /// Palette index.
    pub color: usize,
    /// Shape.
    pub shape: Shape,
}

impl Kind {
    fn describe(self) -> String {
        format!("{} {}", PALETTE[self.color].0, self.shape.word())
    }
}

/// A spatial relation of the caption's first object A to its second B.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Relation {
    /// A's centroid at least `margin` px left of B's.
    LeftOf,
    /// ... right of B's.
    RightOf,
    /// ... above B's (smaller y).
    Above,
    /// ... below B's.
    Below,
}

impl Relation {
    fn words(self) -> &'static str {
        match self {
            Relation::LeftOf => "left of",
            Relation::RightOf => "right of",
            Relation::Above => "above",
            Relation::Below => "below",
        }
    }

    /// Does an object at `a` stand in this relation to one at `b`?
    pub fn holds(self, a: (f64, f64), b: (f64, f64), margin: f64) -> bool {
        // A tiny tolerance so that exact-margin scenes are not lost to
        // rounding of the centroid divisions.
        let m = margin - 1e-9;
        match self {
            Relation::LeftOf => a.0 <= b.0 - m,
            Relation::RightOf => a.0 >= b.0 + m,
            Relation::Above => a.1 <= b.1 - m,
            Relation::Below => a.1 >= b.1 + m,
        }
    }
}

/// A parsed caption.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// "a red circle": exactly one object.
    Single(Kind),
    /// "three red circles": exactly n objects, all of the kind.
    Count(usize, Kind),
    /// "red circles": at least two objects, all of the kind.
    Plural(Kind),
    /// "a red square and a blue circle": exactly these two.
    Binding(Kind, Kind),
    /// "a red square left of a blue circle": these two, A rel B.
    Spatial(Kind, Relation, Kind),
}

fn color_word(w: &str) -> Option<usize> {
    PALETTE.iter().position(|(name, _)| *name == w)
}

fn shape_word(w: &str, plural: bool) -> Option<Shape> {
    Shape::ALL.into_iter().find(|s| {
        if plural {
            w.strip_suffix('s') == Some(s.word())
        } else {
            w == s.word()
        }
    })
}

fn object_phrase(w: &[&str]) -> Option<Kind> {
    match w {
        ["a", c, s] => Some(Kind {
            color: color_word(c)?,
            shape: shape_word(s, false)?,
        }),
        _ => None,
    }
}

fn parse_words(w: &[&str]) -> Option<Claim> {
    match w {
        [c, s] => Some(Claim::Plural(Kind {
            color: color_word(c)?,
            shape: shape_word(s, true)?,
        })),
        ["a", _, _] => object_phrase(w).map(Claim::Single),
        [n, c, s] => {
            let n = NUMBERS.iter().position(|x| x == n)? + 1;
            Some(Claim::Count(
                n,
                Kind {
                    color: color_word(c)?,
                    shape: shape_word(s, n > 1)?,
                },
            ))
        }
        [_, _, _, "and", _, _, _] => {
            let (a, b) = (object_phrase(&w[..3])?, object_phrase(&w[4..])?);
            (a != b).then_some(Claim::Binding(a, b))
        }
        [_, _, _, rel @ .., _, _, _] => {
            let rel = match rel {
                ["left", "of"] => Relation::LeftOf,
                ["right", "of"] => Relation::RightOf,
                ["above"] => Relation::Above,
                ["below"] => Relation::Below,
                _ => return None,
            };
            let (a, b) = (object_phrase(&w[..3])?, object_phrase(&w[w.len() - 3..])?);
            (a != b).then_some(Claim::Spatial(a, rel, b))
        }
        _ => None,
    }
}

/// Parse a caption (case and extra spaces are ignored); the error names it.
pub fn parse(caption: &str) -> Result<Claim, String> {
    let lower = caption.to_lowercase();
    let words: Vec<&str> = lower.split_whitespace().collect();
    parse_words(&words).ok_or_else(|| {
        format!(
            "caption \"{caption}\" is not a ShapeWorld caption (expected e.g. \"a red circle\", \
             \"three red circles\", \"red circles\", \"a red square and a blue circle\" or \
             \"a green triangle left of a yellow square\")"
        )
    })
}

/// One detected object.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Detected {
    /// Colour and shape.
    pub kind: Kind,
    /// Pixel count.
    pub area: usize,
    /// Centroid (x, y) of its pixels.
    pub centroid: (f64, f64),
}

/// Shape from a component's row widths (top to bottom) and box width.
/// square: fill ratio ~1; triangle: bottom rows much wider than the top
/// rows (or a low fill ratio ~0.5-0.65); circle: otherwise (~0.79).
pub fn classify(rows: &[usize], box_width: usize) -> Shape {
    let h = rows.len().max(1);
    let area: usize = rows.iter().sum();
    let fill = area as f64 / (h * box_width.max(1)) as f64;
    let band = h.div_ceil(4);
    let mean = |r: &[usize]| r.iter().sum::<usize>() as f64 / r.len().max(1) as f64;
    let top = mean(&rows[..band.min(rows.len())]);
    let bottom = mean(&rows[rows.len().saturating_sub(band)..]);
    let asymmetry = (bottom - top) / box_width.max(1) as f64;
    if fill >= 0.92 {
        Shape::Square
    } else if asymmetry >= 0.3 || fill < 0.69 {
        Shape::Triangle
    } else {
        Shape::Circle
    }
}

/// Nearest of background (0) and palette (1..=4) for one pixel.
fn nearest(p: &[u8]) -> u8 {
    let d = |c: [u8; 3]| {
        (0..3)
            .map(|k| {
                let e = p[k] as i32 - c[k] as i32;
                e * e
            })
            .sum::<i32>()
    };
    let mut best = (d(BACKGROUND), 0u8);
    for (i, (_, c)) in PALETTE.iter().enumerate() {
        let e = d(*c);
        if e < best.0 {
            best = (e, i as u8 + 1);
        }
    }
    best.1
}

/// Detect objects in row-major RGB `pixels` of `width x height`:
/// components (4-connected) of one palette colour with >= `min_pixels`.
pub fn detect(pixels: &[u8], width: usize, height: usize, min_pixels: usize) -> Vec<Detected> {
    let n = width * height;
    let labels: Vec<u8> = pixels.chunks_exact(3).take(n).map(nearest).collect();
    let mut seen = vec![false; n];
    let mut stack = Vec::new();
    let mut members: Vec<usize> = Vec::new();
    let mut out = Vec::new();
    for start in 0..n {
        let label = labels[start];
        if label == 0 || seen[start] {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        members.clear();
        while let Some(i) = stack.pop() {
            members.push(i);
            let (x, y) = (i % width, i / width);
            let mut visit = |j: usize| {
                if !seen[j] && labels[j] == label {
                    seen[j] = true;
                    stack.push(j);
                }
            };
            if x > 0 {
                visit(i - 1);
            }
            if x + 1 < width {
                visit(i + 1);
            }
            if y > 0 {
                visit(i - width);
            }
            if y + 1 < height {
                visit(i + width);
            }
        }
        if members.len() < min_pixels {
            continue;
        }
        let (mut x0, mut x1, mut y0, mut y1) = (usize::MAX, 0, usize::MAX, 0);
        let (mut sx, mut sy) = (0usize, 0usize);
        for &i in &members {
            let (x, y) = (i % width, i / width);
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
            sx += x;
            sy += y;
        }
        let mut rows = vec![0usize; y1 - y0 + 1];
        for &i in &members {
            rows[i / width - y0] += 1;
        }
        let area = members.len();
        out.push(Detected {
            kind: Kind {
                color: label as usize - 1,
                shape: classify(&rows, x1 - x0 + 1),
            },
            area,
            centroid: (sx as f64 / area as f64, sy as f64 / area as f64),
        });
    }
    out
}

/// The outcome of checking a claim against detected objects.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// Checks passed.
    pub passed: usize,
    /// Checks made.
    pub total: usize,
    /// One line per failed check.
    pub failures: Vec<String>,
}

/// Check `claim` against `objects` (spatial margin in px).
pub fn judge(claim: &Claim, objects: &[Detected], margin: f64) -> Outcome {
    let mut o = Outcome {
        passed: 0,
        total: 0,
        failures: Vec::new(),
    };
    let mut check = |ok: bool, why: String| {
        o.total += 1;
        if ok {
            o.passed += 1;
        } else {
            o.failures.push(why);
        }
    };
    let found = objects.len();
    let of = |k: Kind| objects.iter().filter(|d| d.kind == k).count();
    let count_check = |want: usize| {
        (
            found == want,
            format!("found {found} objects, expected {want}"),
        )
    };
    match *claim {
        Claim::Single(k) => {
            let (ok, why) = count_check(1);
            check(ok, why);
            check(of(k) >= 1, format!("no {}", k.describe()));
        }
        Claim::Count(n, k) => {
            let (ok, why) = count_check(n);
            check(ok, why);
            let have = of(k);
            for i in 1..=n {
                check(
                    have >= i,
                    format!("{} {} found, expected {n}", have, k.describe()),
                );
            }
        }
        Claim::Plural(k) => {
            check(
                found >= 2,
                format!("found {found} objects, expected at least 2"),
            );
            check(
                found >= 2 && of(k) == found,
                format!("{} of {found} objects are {}", of(k), k.describe()),
            );
        }
        Claim::Binding(a, b) => {
            let (ok, why) = count_check(2);
            check(ok, why);
            check(of(a) >= 1, format!("no {}", a.describe()));
            check(of(b) >= 1, format!("no {}", b.describe()));
        }
        Claim::Spatial(a, rel, b) => {
            let (ok, why) = count_check(2);
            check(ok, why);
            check(of(a) >= 1, format!("no {}", a.describe()));
            check(of(b) >= 1, format!("no {}", b.describe()));
            let holds = objects.iter().filter(|d| d.kind == a).any(|da| {
                objects
                    .iter()
                    .filter(|d| d.kind == b)
                    .any(|db| rel.holds(da.centroid, db.centroid, margin))
            });
            check(
                holds,
                format!("no {} {} a {}", a.describe(), rel.words(), b.describe()),
            );
        }
    }
    o
}

/// Settings of one check.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Smallest component counted as an object.
    pub min_pixels: usize,
    /// Spatial margin between centroids, px.
    pub margin: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            min_pixels: 10,
            margin: 3.0,
        }
    }
}

/// The verdict for an image (pure): parse, detect, judge.
pub fn verify(
    pixels: &[u8],
    width: usize,
    height: usize,
    caption: &str,
    s: Settings,
) -> Result<ImageVerdict, String> {
    let claim = parse(caption)?;
    if pixels.len() != width * height * 3 {
        return Err(format!(
            "image has {} bytes, expected {width}x{height}x3 = {}",
            pixels.len(),
            width * height * 3
        ));
    }
    let objects = detect(pixels, width, height, s.min_pixels);
    let o = judge(&claim, &objects, s.margin);
    let score = o.passed as f32 / o.total.max(1) as f32;
    let keep = o.passed == o.total;
    let reason = (!keep).then(|| {
        let seen: Vec<String> = objects.iter().map(|d| d.kind.describe()).collect();
        format!(
            "{} (detected: {})",
            o.failures.join("; "),
            if seen.is_empty() {
                "nothing".to_string()
            } else {
                seen.join(", ")
            }
        )
    });
    Ok(ImageVerdict {
        keep,
        score,
        reason,
    })
}

struct Verifier;

impl Plugin for Verifier {
    fn metadata() -> Metadata {
        Metadata {
            name: "shapeworld-verifier".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kind: PluginKind::ImageFilter,
            description: "Checks a ShapeWorld image against its caption: count, colours, shapes, relation."
                .into(),
            help: "Captions: \"a red circle\", \"three red circles\", \"red circles\", \"a red square \
                   and a blue circle\", \"a green triangle left of|right of|above|below a yellow \
                   square\". Pixels take the nearest of background (240,240,240) and the palette \
                   red/green/blue/yellow; 4-connected components of >= min-pixels are objects; \
                   shape from fill ratio and top-vs-bottom row widths; relations compare \
                   centroids with a margin of `margin` px. score = checks passed / checks \
                   (count, each named object, relation); keep = all passed. An unparseable \
                   caption is an error."
                .into(),
            params: vec![
                params::integer("min-pixels", 10, "smallest component counted as an object (px)"),
                params::number("margin", 3.0, "spatial relations: minimum centroid distance along the axis (px)"),
            ],
        }
    }
}

impl ImageFilter for Verifier {
    fn check(img: &Image, prompt: String, params: Params) -> Result<ImageVerdict, String> {
        let s = Settings {
            min_pixels: params.u32("min-pixels")? as usize,
            margin: params.f64("margin")?,
        };
        // Parse first: a bad caption should fail before copying pixels.
        parse(&prompt)?;
        let pixels = img.pixels()?;
        verify(
            &pixels,
            img.width() as usize,
            img.height() as usize,
            &prompt,
            s,
        )
    }
}

selma_plugin_sdk::export!(image_filter: Verifier);

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny independent drawing kit: float geometry, not the renderer's
    /// integer tests.
    struct Canvas {
        w: usize,
        h: usize,
        px: Vec<u8>,
    }

    impl Canvas {
        fn new() -> Self {
            Canvas {
                w: 32,
                h: 32,
                px: BACKGROUND.repeat(32 * 32),
            }
        }
        fn set(&mut self, x: usize, y: usize, c: [u8; 3]) {
            let k = (y * self.w + x) * 3;
            self.px[k..k + 3].copy_from_slice(&c);
        }
        /// Draw a shape in the box at (x, y) with side s.
        fn draw(&mut self, shape: Shape, color: usize, x: usize, y: usize, s: usize) {
            let c = PALETTE[color].1;
            let sf = s as f64;
            for j in 0..s {
                for i in 0..s {
                    let (u, v) = (i as f64 + 0.5, j as f64 + 0.5);
                    let inside = match shape {
                        Shape::Square => true,
                        Shape::Circle => {
                            (u - sf / 2.0).powi(2) + (v - sf / 2.0).powi(2) <= (sf / 2.0).powi(2)
                        }
                        // Half width at the bottom edge of row j: (j+1)/2.
                        Shape::Triangle => (u - sf / 2.0).abs() <= (j as f64 + 1.0) / 2.0,
                    };
                    if inside {
                        self.set(x + i, y + j, c);
                    }
                }
            }
        }
        fn verdict(&self, caption: &str) -> ImageVerdict {
            verify(&self.px, self.w, self.h, caption, Settings::default()).unwrap()
        }
    }

    const RED: usize = 0;
    const GREEN: usize = 1;
    const BLUE: usize = 2;
    const YELLOW: usize = 3;

    #[test]
    fn parses_every_form_and_rejects_the_rest() {
        let k = |color, shape| Kind { color, shape };
        assert_eq!(
            parse("a red circle"),
            Ok(Claim::Single(k(RED, Shape::Circle)))
        );
        assert_eq!(
            parse("Three Blue  triangles"),
            Ok(Claim::Count(3, k(BLUE, Shape::Triangle)))
        );
        assert_eq!(
            parse("one green square"),
            Ok(Claim::Count(1, k(GREEN, Shape::Square)))
        );
        assert_eq!(
            parse("yellow squares"),
            Ok(Claim::Plural(k(YELLOW, Shape::Square)))
        );
        assert_eq!(
            parse("a red square and a blue circle"),
            Ok(Claim::Binding(
                k(RED, Shape::Square),
                k(BLUE, Shape::Circle)
            ))
        );
        assert_eq!(
            parse("a green triangle left of a yellow square"),
            Ok(Claim::Spatial(
                k(GREEN, Shape::Triangle),
                Relation::LeftOf,
                k(YELLOW, Shape::Square)
            ))
        );
        assert_eq!(
            parse("a green triangle below a yellow square"),
            Ok(Claim::Spatial(
                k(GREEN, Shape::Triangle),
                Relation::Below,
                k(YELLOW, Shape::Square)
            ))
        );
        for bad in [
            "",
            "a red",
            "a pink circle",
            "one red circles",
            "two red circle",
            "five red circles",
            "red circle",
            "a red circle and a red circle",
            "a red circle above a red circle",
            "a red circle near a blue square",
            "a red circle left a blue square",
            "a red circle, and a blue square",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(&format!("\"{bad}\"")), "{e}");
        }
    }

    #[test]
    fn every_shape_and_size_is_recognised() {
        for s in 7..=10 {
            for (shape, color) in [
                (Shape::Circle, RED),
                (Shape::Square, GREEN),
                (Shape::Triangle, YELLOW),
            ] {
                let mut c = Canvas::new();
                c.draw(shape, color, 5, 9, s);
                let d = detect(&c.px, 32, 32, 10);
                assert_eq!(d.len(), 1);
                assert_eq!(d[0].kind, Kind { color, shape }, "size {s}");
            }
        }
        // A square at the exact palette value, hand-counted: area and centroid.
        let mut c = Canvas::new();
        c.draw(Shape::Square, BLUE, 2, 3, 7);
        let d = detect(&c.px, 32, 32, 10);
        assert_eq!(d[0].area, 49);
        assert_eq!(d[0].centroid, (5.0, 6.0));
    }

    #[test]
    fn counts_and_binding() {
        let mut c = Canvas::new();
        c.draw(Shape::Circle, RED, 1, 1, 8);
        c.draw(Shape::Circle, RED, 12, 2, 9);
        c.draw(Shape::Circle, RED, 3, 20, 7);
        assert!(c.verdict("three red circles").keep);
        assert!(c.verdict("red circles").keep);
        let v = c.verdict("two red circles");
        assert!(
            !v.keep && v.reason.as_deref().unwrap().contains("found 3 objects"),
            "{v:?}"
        );
        // 1 count check + 2 presence checks: count fails -> 2/3.
        assert!((v.score - 2.0 / 3.0).abs() < 1e-6);
        assert!(!c.verdict("four red circles").keep);
        assert!(!c.verdict("three blue circles").keep);
        assert!(!c.verdict("three red squares").keep);
        assert_eq!(c.verdict("three blue circles").score, 0.25);
        // Mixed scene: plural must be all one kind.
        c.draw(Shape::Square, BLUE, 20, 20, 8);
        assert!(!c.verdict("red circles").keep);

        let mut c = Canvas::new();
        c.draw(Shape::Square, RED, 2, 2, 9);
        c.draw(Shape::Triangle, BLUE, 18, 15, 10);
        assert!(c.verdict("a red square and a blue triangle").keep);
        assert!(c.verdict("a blue triangle and a red square").keep);
        let v = c.verdict("a blue square and a red triangle");
        assert!(!v.keep && v.score == 1.0 / 3.0, "{v:?}");
        assert!(!c.verdict("a red square").keep);
    }

    #[test]
    fn relations_need_the_margin() {
        let mut c = Canvas::new();
        c.draw(Shape::Square, RED, 2, 10, 7); // centroid (5, 13)
        c.draw(Shape::Circle, GREEN, 20, 12, 8); // centroid (23.5, 15.5)
        assert!(c.verdict("a red square left of a green circle").keep);
        assert!(c.verdict("a green circle right of a red square").keep);
        // dy = 2.5 < 3: neither above nor below.
        assert!(!c.verdict("a red square above a green circle").keep);
        assert!(!c.verdict("a green circle below a red square").keep);
        let v = c.verdict("a red square right of a green circle");
        assert!(!v.keep && (v.score - 0.75).abs() < 1e-6, "{v:?}");

        // Exactly 3 px apart vertically is enough; 2 px is not.
        let mut c = Canvas::new();
        c.draw(Shape::Square, RED, 2, 2, 7); // cy 5
        c.draw(Shape::Square, BLUE, 20, 5, 7); // cy 8
        assert!(c.verdict("a red square above a blue square").keep);
        let mut c = Canvas::new();
        c.draw(Shape::Square, RED, 2, 2, 7); // cy 5
        c.draw(Shape::Square, BLUE, 20, 4, 7); // cy 7
        assert!(!c.verdict("a red square above a blue square").keep);
    }

    #[test]
    fn small_specks_and_off_palette_noise_are_ignored() {
        let mut c = Canvas::new();
        c.draw(Shape::Triangle, GREEN, 10, 10, 9);
        // A 3x3 red speck (9 px < 10) and slightly-off background pixels.
        for y in 25..28 {
            for x in 25..28 {
                c.set(x, y, [210, 50, 45]);
            }
        }
        c.set(0, 0, [250, 235, 230]);
        assert!(c.verdict("a green triangle").keep);
        // Off-palette shading still maps to the nearest colour.
        let mut c = Canvas::new();
        c.draw(Shape::Square, YELLOW, 4, 4, 8);
        for k in (0..c.px.len()).step_by(3) {
            if c.px[k..k + 3] == PALETTE[YELLOW].1 {
                c.px[k] -= 20;
                c.px[k + 2] += 25;
            }
        }
        assert!(c.verdict("one yellow square").keep);
        assert!(c.verdict("one yellow square").reason.is_none());
    }

    #[test]
    fn empty_image_and_bad_input() {
        let c = Canvas::new();
        let v = c.verdict("a red circle");
        assert!(!v.keep && v.score == 0.0 && v.reason.unwrap().contains("detected: nothing"));
        let e = verify(&c.px, 32, 32, "a dog", Settings::default()).unwrap_err();
        assert!(e.contains("\"a dog\""));
        assert!(verify(&c.px[..30], 32, 32, "a red circle", Settings::default()).is_err());
    }
}
