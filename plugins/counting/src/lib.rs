//! The `counting` skill: prompts that state exactly how many of each object
//! there is, with counts of one, two or three (what CountBench-style
//! prompts teach).

use selma_plugin_sdk::skill::StaticSkill;
use selma_plugin_sdk::{Metadata, Plugin, Skill, SkillInfo, Slot};

/// The largest count a prompt may ask for.
pub const MAX_COUNT: usize = 3;

/// Count words, index = count - 1.
const COUNT_WORDS: [&str; MAX_COUNT] = ["one", "two", "three"];

/// (singular, plural) nouns for the main counted object.
const NOUNS: &[(&str, &str)] = &[
    ("apple", "apples"),
    ("cat", "cats"),
    ("dog", "dogs"),
    ("cup", "cups"),
    ("book", "books"),
    ("bird", "birds"),
    ("chair", "chairs"),
    ("candle", "candles"),
    ("balloon", "balloons"),
    ("teddy bear", "teddy bears"),
    ("bicycle", "bicycles"),
    ("orange", "oranges"),
    ("umbrella", "umbrellas"),
    ("sheep", "sheep"),
    ("horse", "horses"),
    ("toy car", "toy cars"),
];

/// (singular, plural) nouns for a second counted object.
const OTHER_NOUNS: &[(&str, &str)] = &[
    ("vase", "vases"),
    ("plate", "plates"),
    ("pumpkin", "pumpkins"),
    ("shoe", "shoes"),
    ("bottle", "bottles"),
    ("lamp", "lamps"),
    ("duck", "ducks"),
    ("ball", "balls"),
];

/// The skill's constants (our own wording); the counted groups are computed.
pub const SKILL: StaticSkill = StaticSkill {
    id: "counting",
    description: "Exact object counts, never more than three of a kind.",
    seeds: &[
        "Three green apples lined up on a wooden cutting board.",
        "Two dogs sitting beside one red fire hydrant.",
        "One lit candle between two glass jars on a shelf.",
    ],
    max_words: 30,
    constraints: &[
        "Every count is one, two or three: never more than three of anything.",
        "Write the numbers as words and make each counted object clearly visible.",
        "Each prompt states the exact number of at least one kind of object.",
    ],
    instruction: "You write short image descriptions that say exactly how many of each \
        object is in the picture. Counts are small (at most three), written as words, and \
        the counted objects are easy to tell apart.",
    patterns: &[
        "{group} on {surface}.",
        "{group} next to {group2}.",
        "{group} and {group2} {place}.",
        "A photo of exactly {group}.",
        "{several} standing in a row {place}.",
    ],
    slots: &[
        (
            "surface",
            &[
                "a wooden table",
                "the floor",
                "a park bench",
                "a snowy field",
                "a red blanket",
            ],
        ),
        (
            "place",
            &[
                "in a garden",
                "on a kitchen counter",
                "by the window",
                "on a sandy beach",
                "in an empty room",
            ],
        ),
    ],
};

/// "one cat", "two cats", "three cats" for every noun; `from` skips counts
/// below it (2 gives only plural groups).
fn groups(nouns: &[(&str, &str)], from: usize) -> Vec<String> {
    let mut out = Vec::new();
    for (singular, plural) in nouns {
        for (i, word) in COUNT_WORDS.iter().enumerate().skip(from - 1) {
            let noun = if i == 0 { singular } else { plural };
            out.push(format!("{word} {noun}"));
        }
    }
    out
}

fn info() -> SkillInfo {
    let mut info = SKILL.info();
    let t = info.templates.as_mut().expect("counting has templates");
    for (name, values) in [
        ("group", groups(NOUNS, 1)),
        ("group2", groups(OTHER_NOUNS, 1)),
        ("several", groups(NOUNS, 2)),
    ] {
        t.slots.push(Slot {
            name: name.to_string(),
            values,
        });
    }
    info
}

struct Counting;

impl Plugin for Counting {
    fn metadata() -> Metadata {
        SKILL.metadata(env!("CARGO_PKG_VERSION"), &info())
    }
}

impl Skill for Counting {
    fn info() -> SkillInfo {
        info()
    }
}

selma_plugin_sdk::export!(skill: Counting);

#[cfg(test)]
mod tests {
    use super::*;
    use selma_plugin_sdk::templates::{distinct_prompts, validate_skill};
    use selma_plugin_sdk::text::tokenize;

    #[test]
    fn skill_is_valid_and_templates_give_200_distinct_prompts() {
        let info = info();
        assert_eq!(validate_skill(&info), Ok(()));
        assert!(distinct_prompts(&info, 200, 1).unwrap().len() >= 200);
    }

    #[test]
    fn no_prompt_counts_past_three() {
        let too_many = [
            "four", "five", "six", "seven", "eight", "nine", "ten", "dozen", "many",
        ];
        let info = info();
        let mut all = distinct_prompts(&info, 2000, 2).unwrap();
        all.extend(info.seeds.iter().cloned());
        for p in &all {
            let tokens = tokenize(p);
            assert!(
                !tokens.iter().any(|t| too_many.contains(&t.as_str())),
                "{p}"
            );
            assert!(
                !tokens.iter().any(|t| t.chars().all(|c| c.is_ascii_digit())),
                "{p}"
            );
            // Each prompt states at least one count.
            assert!(
                tokens.iter().any(|t| COUNT_WORDS.contains(&t.as_str())),
                "{p}"
            );
        }
    }

    #[test]
    fn groups_agree_in_number() {
        assert_eq!(
            groups(&[("cat", "cats")], 1),
            ["one cat", "two cats", "three cats"]
        );
        assert_eq!(groups(&[("cat", "cats")], 2), ["two cats", "three cats"]);
    }
}
