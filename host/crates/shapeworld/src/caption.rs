//! Captions of the ShapeWorld grammar: the five forms (single, count,
//! plural, binding, spatial), their exact text, a parser for that text, and
//! the ground truth of a caption against a scene model.

use crate::scene::{Color, Object, Scene, Shape};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The caption vocabulary (21 words).
pub const VOCABULARY: [&str; 21] = [
    "a",
    "one",
    "two",
    "three",
    "four",
    "red",
    "green",
    "blue",
    "yellow",
    "circle",
    "circles",
    "square",
    "squares",
    "triangle",
    "triangles",
    "and",
    "left",
    "right",
    "of",
    "above",
    "below",
];

/// Number words, index = count - 1.
pub const NUMBER_WORDS: [&str; 4] = ["one", "two", "three", "four"];

/// Minimum centroid distance (px) along a relation's axis.
pub const RELATION_MARGIN: i64 = 3;

/// A caption form (the "skill" of a caption).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Form {
    /// "a red circle"
    Single,
    /// "three red circles"
    Count,
    /// "red circles" (pretraining data only)
    Plural,
    /// "a red square and a blue circle"
    Binding,
    /// "a green triangle left of a yellow square"
    Spatial,
}

impl Form {
    /// Every form.
    pub const ALL: [Form; 5] = [
        Form::Single,
        Form::Count,
        Form::Plural,
        Form::Binding,
        Form::Spatial,
    ];

    /// The form's name (also the `skill` key in metadata.jsonl).
    pub fn name(self) -> &'static str {
        match self {
            Form::Single => "single",
            Form::Count => "count",
            Form::Plural => "plural",
            Form::Binding => "binding",
            Form::Spatial => "spatial",
        }
    }

    /// The form called `name` (also accepts "counting").
    pub fn from_name(name: &str) -> Result<Form> {
        Ok(match name {
            "single" => Form::Single,
            "count" | "counting" => Form::Count,
            "plural" => Form::Plural,
            "binding" => Form::Binding,
            "spatial" => Form::Spatial,
            _ => bail!(
                "unknown ShapeWorld form \"{name}\": use single, count, plural, binding or spatial"
            ),
        })
    }
}

impl fmt::Display for Form {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A spatial relation between the caption's first object A and second B.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Relation {
    /// cxA <= cxB - 3
    LeftOf,
    /// cxA >= cxB + 3
    RightOf,
    /// cyA <= cyB - 3 (y grows downwards)
    Above,
    /// cyA >= cyB + 3
    Below,
}

impl Relation {
    /// Every relation.
    pub const ALL: [Relation; 4] = [
        Relation::LeftOf,
        Relation::RightOf,
        Relation::Above,
        Relation::Below,
    ];

    /// The caption words.
    pub fn words(self) -> &'static str {
        match self {
            Relation::LeftOf => "left of",
            Relation::RightOf => "right of",
            Relation::Above => "above",
            Relation::Below => "below",
        }
    }

    /// Does `a` stand in this relation to `b`? Decided exactly on the
    /// pixel centroids (integer moments, no rounding).
    pub fn holds(self, a: &Object, b: &Object) -> bool {
        let (ax, ay, an) = a.moments();
        let (bx, by, bn) = b.moments();
        // cA - cB = (sA * nB - sB * nA) / (nA * nB); compare against +-3.
        let dx = ax * bn - bx * an;
        let dy = ay * bn - by * an;
        let m = RELATION_MARGIN * an * bn;
        match self {
            Relation::LeftOf => dx <= -m,
            Relation::RightOf => dx >= m,
            Relation::Above => dy <= -m,
            Relation::Below => dy >= m,
        }
    }
}

/// A caption of the grammar.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "form", rename_all = "lowercase")]
pub enum Caption {
    /// "a {c} {s}": exactly one object.
    Single {
        /// Colour.
        color: Color,
        /// Shape.
        shape: Shape,
    },
    /// "{n} {c} {s|plural}": exactly n objects (1..=4), all (c, s).
    Count {
        /// Number of objects.
        n: u8,
        /// Colour.
        color: Color,
        /// Shape.
        shape: Shape,
    },
    /// "{c} {plural}": at least 2 objects, all (c, s).
    Plural {
        /// Colour.
        color: Color,
        /// Shape.
        shape: Shape,
    },
    /// "a {c1} {s1} and a {c2} {s2}": exactly two objects, distinct kinds.
    Binding {
        /// First object (colour, shape).
        a: (Color, Shape),
        /// Second object.
        b: (Color, Shape),
    },
    /// "a {c1} {s1} {rel} a {c2} {s2}": exactly two objects, A rel B.
    Spatial {
        /// First object A.
        a: (Color, Shape),
        /// Relation of A to B.
        rel: Relation,
        /// Second object B.
        b: (Color, Shape),
    },
}

impl Caption {
    /// The caption's form.
    pub fn form(&self) -> Form {
        match self {
            Caption::Single { .. } => Form::Single,
            Caption::Count { .. } => Form::Count,
            Caption::Plural { .. } => Form::Plural,
            Caption::Binding { .. } => Form::Binding,
            Caption::Spatial { .. } => Form::Spatial,
        }
    }

    /// The caption text (lowercase words, single spaces).
    pub fn text(&self) -> String {
        let one = |(c, s): (Color, Shape)| format!("a {} {}", c.word(), s.word());
        match *self {
            Caption::Single { color, shape } => one((color, shape)),
            Caption::Count { n, color, shape } => {
                let noun = if n == 1 { shape.word() } else { shape.plural() };
                let word = NUMBER_WORDS
                    .get((n as usize).wrapping_sub(1))
                    .copied()
                    .unwrap_or("?");
                format!("{word} {} {noun}", color.word())
            }
            Caption::Plural { color, shape } => format!("{} {}", color.word(), shape.plural()),
            Caption::Binding { a, b } => format!("{} and {}", one(a), one(b)),
            Caption::Spatial { a, rel, b } => format!("{} {} {}", one(a), rel.words(), one(b)),
        }
    }

    /// Parse caption text (case and extra whitespace are ignored). The
    /// error names the caption.
    pub fn parse(text: &str) -> Result<Caption> {
        let lower = text.to_lowercase();
        let w: Vec<&str> = lower.split_whitespace().collect();
        let color = |s: &str| Color::ALL.into_iter().find(|c| c.word() == s);
        let singular = |s: &str| Shape::ALL.into_iter().find(|x| x.word() == s);
        let plural = |s: &str| Shape::ALL.into_iter().find(|x| x.plural() == s);
        let object = |w: &[&str]| -> Option<(Color, Shape)> {
            match w {
                ["a", c, s] => Some((color(c)?, singular(s)?)),
                _ => None,
            }
        };
        let parsed = match w.as_slice() {
            ["a", c, s] => match (color(c), singular(s)) {
                (Some(color), Some(shape)) => Some(Caption::Single { color, shape }),
                _ => None,
            },
            [n, c, s] if NUMBER_WORDS.contains(n) => {
                let n = NUMBER_WORDS.iter().position(|x| x == n).unwrap() as u8 + 1;
                let shape = if n == 1 { singular(s) } else { plural(s) };
                match (color(c), shape) {
                    (Some(color), Some(shape)) => Some(Caption::Count { n, color, shape }),
                    _ => None,
                }
            }
            [c, s] => match (color(c), plural(s)) {
                (Some(color), Some(shape)) => Some(Caption::Plural { color, shape }),
                _ => None,
            },
            [a @ .., "and", _, _, _] if a.len() == 3 => match (object(a), object(&w[4..])) {
                (Some(a), Some(b)) if a != b => Some(Caption::Binding { a, b }),
                _ => None,
            },
            _ if w.len() == 7 || w.len() == 8 => {
                let (rel, rest) = match &w[3..] {
                    ["left", "of", ..] => (Some(Relation::LeftOf), 5),
                    ["right", "of", ..] => (Some(Relation::RightOf), 5),
                    ["above", ..] => (Some(Relation::Above), 4),
                    ["below", ..] => (Some(Relation::Below), 4),
                    _ => (None, 0),
                };
                match (object(&w[..3]), rel, w.len() == rest + 3) {
                    (Some(a), Some(rel), true) => match object(&w[rest..]) {
                        Some(b) if a != b => Some(Caption::Spatial { a, rel, b }),
                        _ => None,
                    },
                    _ => None,
                }
            }
            _ => None,
        };
        match parsed {
            Some(c) => Ok(c),
            None => bail!(
                "caption \"{text}\" is not a ShapeWorld caption (forms: \"a red circle\", \
                 \"three red circles\", \"red circles\", \"a red square and a blue circle\", \
                 \"a green triangle left of a yellow square\")"
            ),
        }
    }

    /// Ground truth: is the caption true of `scene` (from the scene model,
    /// not from pixels)?
    pub fn holds(&self, scene: &Scene) -> bool {
        let o = &scene.objects;
        let is = |x: &Object, (c, s): (Color, Shape)| x.color == c && x.shape == s;
        let all = |c: Color, s: Shape| o.iter().all(|x| is(x, (c, s)));
        match *self {
            Caption::Single { color, shape } => o.len() == 1 && all(color, shape),
            Caption::Count { n, color, shape } => o.len() == n as usize && all(color, shape),
            Caption::Plural { color, shape } => o.len() >= 2 && all(color, shape),
            Caption::Binding { a, b } => {
                o.len() == 2 && ((is(&o[0], a) && is(&o[1], b)) || (is(&o[0], b) && is(&o[1], a)))
            }
            Caption::Spatial { a, rel, b } => {
                o.len() == 2
                    && ((is(&o[0], a) && is(&o[1], b) && rel.holds(&o[0], &o[1]))
                        || (is(&o[1], a) && is(&o[0], b) && rel.holds(&o[1], &o[0])))
            }
        }
    }

    /// Every caption of `form` (the whole grammar of that form).
    pub fn all(form: Form) -> Vec<Caption> {
        let kinds: Vec<(Color, Shape)> = Color::ALL
            .into_iter()
            .flat_map(|c| Shape::ALL.into_iter().map(move |s| (c, s)))
            .collect();
        let pairs = || {
            kinds
                .iter()
                .flat_map(|&a| kinds.iter().filter(move |&&b| b != a).map(move |&b| (a, b)))
        };
        match form {
            Form::Single => kinds
                .iter()
                .map(|&(color, shape)| Caption::Single { color, shape })
                .collect(),
            Form::Count => (1..=4)
                .flat_map(|n| {
                    kinds
                        .iter()
                        .map(move |&(color, shape)| Caption::Count { n, color, shape })
                })
                .collect(),
            Form::Plural => kinds
                .iter()
                .map(|&(color, shape)| Caption::Plural { color, shape })
                .collect(),
            Form::Binding => pairs().map(|(a, b)| Caption::Binding { a, b }).collect(),
            Form::Spatial => pairs()
                .flat_map(|(a, b)| {
                    Relation::ALL
                        .into_iter()
                        .map(move |rel| Caption::Spatial { a, rel, b })
                })
                .collect(),
        }
    }
}

impl fmt::Display for Caption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn text_matches_the_grammar() {
        let c = Caption::Count {
            n: 3,
            color: Color::Red,
            shape: Shape::Circle,
        };
        assert_eq!(c.text(), "three red circles");
        let c = Caption::Count {
            n: 1,
            color: Color::Blue,
            shape: Shape::Triangle,
        };
        assert_eq!(c.text(), "one blue triangle");
        let s = Caption::Spatial {
            a: (Color::Green, Shape::Triangle),
            rel: Relation::LeftOf,
            b: (Color::Yellow, Shape::Square),
        };
        assert_eq!(s.text(), "a green triangle left of a yellow square");
        let b = Caption::Binding {
            a: (Color::Red, Shape::Square),
            b: (Color::Blue, Shape::Circle),
        };
        assert_eq!(b.text(), "a red square and a blue circle");
        let p = Caption::Plural {
            color: Color::Yellow,
            shape: Shape::Square,
        };
        assert_eq!(p.text(), "yellow squares");
    }

    #[test]
    fn every_caption_round_trips_and_uses_only_the_vocabulary() {
        let counts = [12, 48, 12, 132, 528];
        let mut texts = BTreeSet::new();
        for (form, want) in Form::ALL.into_iter().zip(counts) {
            let all = Caption::all(form);
            assert_eq!(all.len(), want, "{form}");
            for c in all {
                let t = c.text();
                assert!(t.split(' ').all(|w| VOCABULARY.contains(&w)), "{t}");
                assert!(t.split(' ').count() <= 8, "{t}");
                assert_eq!(Caption::parse(&t).unwrap(), c, "{t}");
                assert!(texts.insert(t));
            }
        }
        // Case and spacing are forgiven.
        assert_eq!(
            Caption::parse("  A Red   circle ").unwrap(),
            Caption::Single {
                color: Color::Red,
                shape: Shape::Circle
            }
        );
    }

    #[test]
    fn bad_captions_are_errors_naming_them() {
        for bad in [
            "",
            "a red",
            "a purple circle",
            "two red circle",
            "one red circles",
            "five red circles",
            "red circle",
            "a red circle and a red circle",
            "a red circle left a blue square",
            "a red circle near a blue square",
            "a red circle above a red circle",
            "a red circle above a blue square and",
        ] {
            let e = Caption::parse(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("\"{bad}\"")), "{e}");
        }
    }
}
