//! The `sw-spatial` skill (ShapeWorld): two different objects in a spatial
//! relation, "a green triangle left of a yellow square". The objects must
//! differ in colour or shape, which templates cannot express slot by slot,
//! so one computed slot per relation lists the valid captions; one pattern
//! per relation makes the template generator draw relations uniformly:
//! 4 relations x 12 x 11 = 528 captions.

use selma_plugin_sdk::skill::StaticSkill;
use selma_plugin_sdk::{Metadata, Plugin, Skill, SkillInfo, Slot};

const COLORS: [&str; 4] = ["red", "green", "blue", "yellow"];
const SHAPES: [&str; 3] = ["circle", "square", "triangle"];
/// (slot name, relation words).
const RELATIONS: [(&str, &str); 4] = [
    ("left-of", "left of"),
    ("right-of", "right of"),
    ("above", "above"),
    ("below", "below"),
];

/// The skill's constants (the per-relation slots are computed).
pub const SKILL: StaticSkill = StaticSkill {
    id: "sw-spatial",
    description: "ShapeWorld: two objects, the first left of, right of, above or below the second.",
    seeds: &[
        "a green triangle left of a yellow square",
        "a red circle above a blue circle",
        "a blue square below a red triangle",
    ],
    max_words: 10,
    constraints: &[
        "Use only the words a, left, right, of, above, below, red, green, blue, yellow, circle, square, triangle.",
        "Write \"a <colour> <shape> <relation> a <colour> <shape>\" with two different objects.",
    ],
    instruction: "You write captions of tiny images showing two coloured shapes in a spatial \
        relation. A caption is \"a <colour> <shape> <relation> a <colour> <shape>\" with \
        colours red, green, blue or yellow, shapes circle, square or triangle, and relation \
        left of, right of, above or below; the objects differ in colour or shape, e.g. \
        \"a blue circle right of a blue square\".",
    patterns: &["{left-of}", "{right-of}", "{above}", "{below}"],
    slots: &[],
};

/// Every spatial caption with relation words `rel`, first object slowest.
pub fn captions(rel: &str) -> Vec<String> {
    let kinds: Vec<(&str, &str)> = COLORS
        .iter()
        .flat_map(|c| SHAPES.iter().map(move |s| (*c, *s)))
        .collect();
    let mut out = Vec::new();
    for a in &kinds {
        for b in kinds.iter().filter(|b| *b != a) {
            out.push(format!("a {} {} {rel} a {} {}", a.0, a.1, b.0, b.1));
        }
    }
    out
}

fn info() -> SkillInfo {
    let mut info = SKILL.info();
    let t = info.templates.as_mut().expect("sw-spatial has templates");
    for (name, words) in RELATIONS {
        t.slots.push(Slot {
            name: name.into(),
            values: captions(words),
        });
    }
    info
}

struct Spatial;

impl Plugin for Spatial {
    fn metadata() -> Metadata {
        SKILL.metadata(env!("CARGO_PKG_VERSION"), &info())
    }
}

impl Skill for Spatial {
    fn info() -> SkillInfo {
        info()
    }
}

selma_plugin_sdk::export!(skill: Spatial);

#[cfg(test)]
mod tests {
    use super::*;
    use selma_plugin_sdk::rng::SplitMix64;
    use selma_plugin_sdk::templates::{validate_skill, TemplateSet};
    use std::collections::BTreeSet;

    #[test]
    fn templates_are_exactly_the_spatial_form() {
        let info = info();
        assert_eq!(validate_skill(&info), Ok(()));
        let set = TemplateSet::new(info.templates.as_ref().unwrap()).unwrap();
        let got: BTreeSet<String> = (0..set.total())
            .map(|i| set.nth(i).unwrap().to_lowercase())
            .collect();
        let mut phrases = Vec::new();
        for c in ["red", "green", "blue", "yellow"] {
            for s in ["circle", "square", "triangle"] {
                phrases.push(format!("a {c} {s}"));
            }
        }
        let mut want = BTreeSet::new();
        for rel in ["left of", "right of", "above", "below"] {
            for a in &phrases {
                for b in &phrases {
                    if a != b {
                        want.insert(format!("{a} {rel} {b}"));
                    }
                }
            }
        }
        assert_eq!(set.total(), 528);
        assert_eq!(got, want);
        for seed in &info.seeds {
            assert!(want.contains(seed), "{seed}");
        }
    }

    #[test]
    fn relations_are_drawn_uniformly() {
        let set = TemplateSet::new(info().templates.as_ref().unwrap()).unwrap();
        let mut rng = SplitMix64::new(5);
        let n = 8000;
        let above = (0..n)
            .filter(|_| set.sample(&mut rng).contains(" above "))
            .count();
        assert!((above as f64 / n as f64 - 0.25).abs() < 0.02, "{above}");
    }
}
