//! The `sw-single` skill (ShapeWorld): one object of a named colour and
//! shape, "a red circle". Its templates enumerate exactly the grammar's
//! single form: 4 colours x 3 shapes = 12 captions.

use selma_plugin_sdk::skill::StaticSkill;
use selma_plugin_sdk::{Metadata, Plugin, Skill, SkillInfo};

/// The skill's constants.
pub const SKILL: StaticSkill = StaticSkill {
    id: "sw-single",
    description: "ShapeWorld: a single object of the named colour and shape.",
    seeds: &["a red circle", "a blue triangle", "a yellow square"],
    max_words: 10,
    constraints: &[
        "Use only the words a, red, green, blue, yellow, circle, square, triangle.",
        "Write exactly three lowercase words: \"a\", a colour, a shape.",
    ],
    instruction: "You write captions of tiny images showing one coloured shape. A caption is \
        \"a\", then a colour (red, green, blue or yellow), then a shape (circle, square or \
        triangle), e.g. \"a green square\".",
    patterns: &["a {color} {shape}"],
    slots: &[
        ("color", &["red", "green", "blue", "yellow"]),
        ("shape", &["circle", "square", "triangle"]),
    ],
};

struct Single;

impl Plugin for Single {
    fn metadata() -> Metadata {
        SKILL.metadata(env!("CARGO_PKG_VERSION"), &SKILL.info())
    }
}

impl Skill for Single {
    fn info() -> SkillInfo {
        SKILL.info()
    }
}

selma_plugin_sdk::export!(skill: Single);

#[cfg(test)]
mod tests {
    use super::*;
    use selma_plugin_sdk::templates::{validate_skill, TemplateSet};
    use std::collections::BTreeSet;

    #[test]
    fn templates_are_exactly_the_single_form() {
        let info = SKILL.info();
        assert_eq!(validate_skill(&info), Ok(()));
        let set = TemplateSet::new(info.templates.as_ref().unwrap()).unwrap();
        let got: BTreeSet<String> = (0..set.total())
            .map(|i| set.nth(i).unwrap().to_lowercase())
            .collect();
        let mut want = BTreeSet::new();
        for c in ["red", "green", "blue", "yellow"] {
            for s in ["circle", "square", "triangle"] {
                want.insert(format!("a {c} {s}"));
            }
        }
        assert_eq!(set.total(), 12);
        assert_eq!(got, want);
        for seed in &info.seeds {
            assert!(want.contains(seed), "{seed}");
        }
    }
}
