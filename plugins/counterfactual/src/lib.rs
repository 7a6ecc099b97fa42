//! The `counterfactual` skill: scenes that defy common sense (impossible
//! combinations, wrong materials, sizes or places), described plainly so
//! that a model cannot "correct" them back to the usual scene (what
//! Whoops-style prompts teach).

use selma_plugin_sdk::skill::StaticSkill;
use selma_plugin_sdk::{Metadata, Plugin, Skill, SkillInfo};

/// The skill's constants (our own wording).
pub const SKILL: StaticSkill = StaticSkill {
    id: "counterfactual",
    description: "Commonsense-defying combinations: impossible materials, sizes, places and deeds.",
    seeds: &[
        "A snowman sunbathing on a tropical beach under a blazing sun.",
        "A goldfish swimming inside a light bulb that hangs from the ceiling.",
        "An elephant balancing on a tiny teacup in a living room.",
    ],
    max_words: 30,
    constraints: &[
        "Each prompt combines things in a way that contradicts common sense or everyday physics.",
        "Keep the scene concrete and easy to picture, so the contradiction is clearly visible.",
        "One surprising combination per prompt, in a single sentence.",
    ],
    instruction: "You write descriptions of surprising pictures that defy common sense: \
        familiar animals, objects or people in impossible combinations, made of the wrong \
        material, at the wrong size or in the wrong place, described plainly so the oddity \
        is easy to see.",
    patterns: &[
        "{animal} {human_activity} {place}.",
        "{object} made of {material} {situation}.",
        "A tiny {big_thing} sitting on {small_place}.",
        "A giant {small_thing} towering over {scene}.",
        "{fire_thing} burning {wet_place}.",
    ],
    slots: &[
        (
            "animal",
            &[
                "A penguin",
                "A giraffe",
                "A crocodile",
                "An octopus",
                "A sheep",
                "A goldfish",
                "A turtle",
                "A snail",
            ],
        ),
        (
            "human_activity",
            &[
                "playing the piano",
                "driving a taxi",
                "reading a newspaper",
                "lifting weights",
                "painting a portrait",
                "cooking pancakes",
                "typing on a laptop",
            ],
        ),
        (
            "place",
            &[
                "in a library",
                "on a busy highway",
                "at the top of a mountain",
                "in an office",
                "on the moon",
                "in a classroom",
            ],
        ),
        (
            "object",
            &[
                "A teapot",
                "A bicycle",
                "A candle",
                "A hammer",
                "An umbrella",
                "A pair of shoes",
                "A bridge",
            ],
        ),
        (
            "material",
            &["ice", "bread", "glass", "feathers", "soap bubbles", "paper"],
        ),
        (
            "situation",
            &[
                "on a hot stove",
                "in the pouring rain",
                "holding up a truck",
                "next to a campfire",
                "under a waterfall",
            ],
        ),
        (
            "big_thing",
            &[
                "elephant",
                "whale",
                "lighthouse",
                "bus",
                "mountain",
                "pirate ship",
            ],
        ),
        (
            "small_place",
            &[
                "a fingertip",
                "a teaspoon",
                "a coin",
                "a leaf",
                "a chess piece",
            ],
        ),
        (
            "small_thing",
            &[
                "ladybug",
                "strawberry",
                "pencil",
                "snail",
                "rubber duck",
                "paperclip",
            ],
        ),
        (
            "scene",
            &[
                "a city skyline",
                "a herd of cows",
                "a football stadium",
                "a pine forest",
                "a harbor full of boats",
            ],
        ),
        (
            "fire_thing",
            &[
                "A campfire",
                "A candle",
                "A torch",
                "A fireplace",
                "A pile of logs",
            ],
        ),
        (
            "wet_place",
            &[
                "underwater in a coral reef",
                "inside a block of ice",
                "in the middle of a rainstorm",
                "at the bottom of a swimming pool",
                "inside a fish tank",
            ],
        ),
    ],
};

struct Counterfactual;

impl Plugin for Counterfactual {
    fn metadata() -> Metadata {
        SKILL.metadata(env!("CARGO_PKG_VERSION"), &SKILL.info())
    }
}

impl Skill for Counterfactual {
    fn info() -> SkillInfo {
        SKILL.info()
    }
}

selma_plugin_sdk::export!(skill: Counterfactual);

#[cfg(test)]
mod tests {
    use super::*;
    use selma_plugin_sdk::templates::{distinct_prompts, validate_skill};

    #[test]
    fn skill_is_valid_and_templates_give_200_distinct_prompts() {
        let info = SKILL.info();
        assert_eq!(validate_skill(&info), Ok(()));
        assert!(distinct_prompts(&info, 200, 1).unwrap().len() >= 200);
    }
}
