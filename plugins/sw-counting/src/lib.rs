//! The `sw-counting` skill (ShapeWorld): an exact number (one to four) of
//! objects of one colour and shape, "three red circles". One pattern per
//! number, so the template generator draws n uniformly; the fillings are
//! exactly the grammar's count form: 4 numbers x 4 colours x 3 shapes = 48.

use selma_plugin_sdk::skill::StaticSkill;
use selma_plugin_sdk::{Metadata, Plugin, Skill, SkillInfo};

/// The skill's constants.
pub const SKILL: StaticSkill = StaticSkill {
    id: "sw-counting",
    description: "ShapeWorld: exactly one to four objects of the named colour and shape.",
    seeds: &["three red circles", "one blue square", "four yellow triangles"],
    max_words: 10,
    constraints: &[
        "Use only the words one, two, three, four, red, green, blue, yellow, circle(s), square(s), triangle(s).",
        "Write a number word, a colour and a shape, plural when the number is above one.",
    ],
    instruction: "You write captions of tiny images showing a few shapes of one colour. A \
        caption is a number (one to four), a colour (red, green, blue or yellow) and a shape \
        (circle, square or triangle; plural above one), e.g. \"two green squares\".",
    patterns: &[
        "one {color} {shape}",
        "two {color} {shapes}",
        "three {color} {shapes}",
        "four {color} {shapes}",
    ],
    slots: &[
        ("color", &["red", "green", "blue", "yellow"]),
        ("shape", &["circle", "square", "triangle"]),
        ("shapes", &["circles", "squares", "triangles"]),
    ],
};

struct Counting;

impl Plugin for Counting {
    fn metadata() -> Metadata {
        SKILL.metadata(env!("CARGO_PKG_VERSION"), &SKILL.info())
    }
}

impl Skill for Counting {
    fn info() -> SkillInfo {
        SKILL.info()
    }
}

selma_plugin_sdk::export!(skill: Counting);

#[cfg(test)]
mod tests {
    use super::*;
    use selma_plugin_sdk::rng::SplitMix64;
    use selma_plugin_sdk::templates::{validate_skill, TemplateSet};
    use std::collections::BTreeSet;

    #[test]
    fn templates_are_exactly_the_count_form() {
        let info = SKILL.info();
        assert_eq!(validate_skill(&info), Ok(()));
        let set = TemplateSet::new(info.templates.as_ref().unwrap()).unwrap();
        let got: BTreeSet<String> = (0..set.total())
            .map(|i| set.nth(i).unwrap().to_lowercase())
            .collect();
        let mut want = BTreeSet::new();
        for (k, n) in ["one", "two", "three", "four"].iter().enumerate() {
            for c in ["red", "green", "blue", "yellow"] {
                for s in ["circle", "square", "triangle"] {
                    let s = if k == 0 {
                        s.to_string()
                    } else {
                        format!("{s}s")
                    };
                    want.insert(format!("{n} {c} {s}"));
                }
            }
        }
        assert_eq!(set.total(), 48);
        assert_eq!(got, want);
        for seed in &info.seeds {
            assert!(want.contains(seed), "{seed}");
        }
    }

    #[test]
    fn numbers_are_drawn_uniformly() {
        let set = TemplateSet::new(SKILL.info().templates.as_ref().unwrap()).unwrap();
        let mut rng = SplitMix64::new(3);
        let n = 8000;
        let fours = (0..n)
            .filter(|_| set.sample(&mut rng).to_lowercase().starts_with("four "))
            .count();
        assert!((fours as f64 / n as f64 - 0.25).abs() < 0.02, "{fours}");
    }
}
