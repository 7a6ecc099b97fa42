//! The `general` skill: short, realistic captions of everyday scenes with
//! many kinds of people, animals and objects (what COCO-style captions teach).

use selma_plugin_sdk::skill::StaticSkill;
use selma_plugin_sdk::{Metadata, Plugin, Skill, SkillInfo};

/// The skill's constants (our own wording).
pub const SKILL: StaticSkill = StaticSkill {
    id: "general",
    description: "Short everyday scenes: who or what is in a photo, doing what, where.",
    seeds: &[
        "A man in a yellow raincoat walks a small brown dog along a wet city street.",
        "Two children share slices of watermelon at a wooden picnic table in a park.",
        "A kitchen counter holding a cutting board, a knife and a bowl of ripe tomatoes.",
        "A red bus waits at a crowded stop while people climb aboard with shopping bags.",
    ],
    max_words: 30,
    constraints: &[
        "Describe one realistic, everyday scene that an ordinary photograph could show.",
        "Name concrete people, animals or objects, what they are doing and where they are.",
        "Use plain descriptive language: no art styles, camera jargon or feelings.",
    ],
    instruction: "You write captions for photographs of everyday life. Each caption is one \
        sentence describing a realistic scene: who or what is in it, what they are doing \
        and where it happens.",
    patterns: &[
        "{subject} {action} {place}.",
        "{subject} {action} {place}, with {bystander} nearby.",
        "A {object_adj} {object} on {surface} in {room}.",
        "{subject} holding {held} {place}.",
        "{vehicle} parked {street_place} on a {weather} day.",
    ],
    slots: &[
        (
            "subject",
            &[
                "a man",
                "a woman",
                "an old man",
                "a young girl",
                "a little boy",
                "a group of teenagers",
                "two friends",
                "a chef in a white apron",
                "a police officer",
                "a farmer",
                "a tourist with a backpack",
                "a mother and her son",
            ],
        ),
        (
            "action",
            &[
                "walking a dog",
                "riding a bicycle",
                "eating a sandwich",
                "reading a newspaper",
                "flying a kite",
                "carrying an umbrella",
                "throwing a frisbee",
                "waiting for a bus",
                "talking on a phone",
                "pushing a shopping cart",
                "taking a photo",
                "selling fruit",
            ],
        ),
        (
            "place",
            &[
                "in a park",
                "on a busy street",
                "at the beach",
                "in a crowded market",
                "next to a river",
                "at a train station",
                "in a snowy field",
                "outside a cafe",
                "on a wooden pier",
                "in a parking lot",
            ],
        ),
        (
            "bystander",
            &[
                "a small dog",
                "a curious child",
                "a street vendor",
                "a flock of pigeons",
                "an old woman",
            ],
        ),
        (
            "object_adj",
            &[
                "white",
                "chipped",
                "shiny",
                "half-empty",
                "large",
                "striped",
            ],
        ),
        (
            "object",
            &[
                "coffee mug",
                "bowl of soup",
                "vase of flowers",
                "laptop",
                "stack of plates",
                "teapot",
                "pizza box",
                "basket of apples",
            ],
        ),
        (
            "surface",
            &[
                "a wooden table",
                "a marble counter",
                "a window sill",
                "a desk",
                "a tiled floor",
            ],
        ),
        (
            "room",
            &[
                "a sunny kitchen",
                "a small office",
                "a hotel room",
                "a living room",
                "a dim restaurant",
            ],
        ),
        (
            "held",
            &[
                "a bunch of balloons",
                "a surfboard",
                "a tennis racket",
                "a cup of coffee",
                "a sleeping baby",
                "a paper map",
                "a large fish",
            ],
        ),
        (
            "vehicle",
            &[
                "A red truck",
                "A yellow taxi",
                "A motorcycle",
                "A city bus",
                "An old blue car",
                "A delivery van",
            ],
        ),
        (
            "street_place",
            &[
                "beside a fire hydrant",
                "in front of a bakery",
                "under a tree",
                "next to a brick building",
                "at a gas station",
            ],
        ),
        ("weather", &["rainy", "sunny", "foggy", "snowy", "windy"]),
    ],
};

struct General;

impl Plugin for General {
    fn metadata() -> Metadata {
        SKILL.metadata(env!("CARGO_PKG_VERSION"), &SKILL.info())
    }
}

impl Skill for General {
    fn info() -> SkillInfo {
        SKILL.info()
    }
}

selma_plugin_sdk::export!(skill: General);

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
