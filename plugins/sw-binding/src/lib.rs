//! The `sw-binding` skill (ShapeWorld): two objects, each with its own
//! colour and shape, "a red square and a blue circle". The two must differ
//! in colour or shape, a constraint templates cannot express slot by slot,
//! so the one `{caption}` slot lists every valid caption: 12 x 11 = 132.

use selma_plugin_sdk::skill::StaticSkill;
use selma_plugin_sdk::{Metadata, Plugin, Skill, SkillInfo, Slot};

const COLORS: [&str; 4] = ["red", "green", "blue", "yellow"];
const SHAPES: [&str; 3] = ["circle", "square", "triangle"];

/// The skill's constants (the `caption` slot is computed).
pub const SKILL: StaticSkill = StaticSkill {
    id: "sw-binding",
    description: "ShapeWorld: two objects, each with its own colour and shape.",
    seeds: &[
        "a red square and a blue circle",
        "a green triangle and a yellow triangle",
        "a blue circle and a blue square",
    ],
    max_words: 10,
    constraints: &[
        "Use only the words a, and, red, green, blue, yellow, circle, square, triangle.",
        "Write \"a <colour> <shape> and a <colour> <shape>\" with two different objects.",
    ],
    instruction: "You write captions of tiny images showing two coloured shapes. A caption \
        is \"a <colour> <shape> and a <colour> <shape>\" with colours red, green, blue or \
        yellow and shapes circle, square or triangle; the two objects differ in colour or \
        shape, e.g. \"a red circle and a green circle\".",
    patterns: &["{caption}"],
    slots: &[],
};

/// Every binding caption, first object slowest.
pub fn captions() -> Vec<String> {
    let kinds: Vec<(&str, &str)> = COLORS
        .iter()
        .flat_map(|c| SHAPES.iter().map(move |s| (*c, *s)))
        .collect();
    let mut out = Vec::new();
    for a in &kinds {
        for b in kinds.iter().filter(|b| *b != a) {
            out.push(format!("a {} {} and a {} {}", a.0, a.1, b.0, b.1));
        }
    }
    out
}

fn info() -> SkillInfo {
    let mut info = SKILL.info();
    let t = info.templates.as_mut().expect("sw-binding has templates");
    t.slots.push(Slot {
        name: "caption".into(),
        values: captions(),
    });
    info
}

struct Binding;

impl Plugin for Binding {
    fn metadata() -> Metadata {
        SKILL.metadata(env!("CARGO_PKG_VERSION"), &info())
    }
}

impl Skill for Binding {
    fn info() -> SkillInfo {
        info()
    }
}

selma_plugin_sdk::export!(skill: Binding);

#[cfg(test)]
mod tests {
    use super::*;
    use selma_plugin_sdk::templates::{validate_skill, TemplateSet};
    use std::collections::BTreeSet;

    #[test]
    fn templates_are_exactly_the_binding_form() {
        let info = info();
        assert_eq!(validate_skill(&info), Ok(()));
        let set = TemplateSet::new(info.templates.as_ref().unwrap()).unwrap();
        let got: BTreeSet<String> = (0..set.total())
            .map(|i| set.nth(i).unwrap().to_lowercase())
            .collect();
        // Independently: all 144 ordered pairs of phrases minus the 12 equal ones.
        let mut phrases = Vec::new();
        for c in ["red", "green", "blue", "yellow"] {
            for s in ["circle", "square", "triangle"] {
                phrases.push(format!("a {c} {s}"));
            }
        }
        let mut want = BTreeSet::new();
        for a in &phrases {
            for b in &phrases {
                if a != b {
                    want.insert(format!("{a} and {b}"));
                }
            }
        }
        assert_eq!(set.total(), 132);
        assert_eq!(got, want);
        for seed in &info.seeds {
            assert!(want.contains(seed), "{seed}");
        }
    }
}
