//! The `paragraph` skill: long, narrated descriptions that walk through an
//! image region by region (what Localized-Narratives-style captions teach).

use selma_plugin_sdk::skill::StaticSkill;
use selma_plugin_sdk::{Metadata, Plugin, Skill, SkillInfo};

/// The skill's constants (our own wording).
pub const SKILL: StaticSkill = StaticSkill {
    id: "paragraph",
    description: "Long, paragraph-style descriptions narrating an image part by part.",
    seeds: &[
        "In this picture we can see a wooden bench in front of a brick wall. On the left side \
         there is a bicycle leaning against a pole, and at the top we can see a cloudy sky.",
        "This image shows a table with a plate of pasta and a glass of water. Behind the table \
         a woman is sitting on a chair and smiling. In the background there are shelves full of books.",
        "Here we can see two horses standing on the grass near a fence. There are trees behind \
         them, and on the right side we can see a small red barn with a white door.",
    ],
    max_words: 50,
    constraints: &[
        "Write two or three sentences narrating what is visible, as if describing the image aloud.",
        "Say where things are: foreground and background, left and right, top and bottom.",
        "Describe only what can be seen: no story, no feelings, no guesses.",
    ],
    instruction: "You describe images the way a person narrates a photo to a listener who \
        cannot see it: a short paragraph that starts with the main subject, then walks \
        through what surrounds it, saying where each thing is.",
    patterns: &[
        "In this picture we can see {subject} {location}. On the {side} side there is \
         {side_thing}, and at the top we can see {top}.",
        "This image shows {subject} {location}. Behind it there is {background}. On the {side} \
         we can see {side_thing}.",
        "Here we can see {subject} {location}. In the background there is {background}, and \
         at the bottom there is {ground}.",
        "In the foreground of this image there is {subject} {location}. Behind it we can see \
         {background} and {top}.",
    ],
    slots: &[
        (
            "subject",
            &[
                "a brown dog", "an old woman with a walking stick", "a wooden boat",
                "a group of people", "a white car", "a small girl in a red dress",
                "a basket of fruit", "a man on a horse", "a yellow tram", "a sleeping cat",
            ],
        ),
        (
            "location",
            &[
                "on a bench", "on the road", "on the grass", "near a lake",
                "on a wooden table", "in front of a shop",
            ],
        ),
        ("side", &["left", "right"]),
        (
            "side_thing",
            &[
                "a lamp post", "a parked bicycle", "a tall tree", "a dustbin",
                "a few potted plants", "a signboard",
            ],
        ),
        (
            "top",
            &[
                "the sky with clouds", "a clear blue sky", "some electric wires",
                "the branches of a tree", "a ceiling light",
            ],
        ),
        (
            "background",
            &[
                "a building with many windows", "some hills", "a fence with trees",
                "a wall with a painting", "mountains covered with snow", "a row of houses",
            ],
        ),
        ("ground", &["a stone path", "some dry leaves", "the sand", "a carpet", "the water"]),
    ],
};

struct Paragraph;

impl Plugin for Paragraph {
    fn metadata() -> Metadata {
        SKILL.metadata(env!("CARGO_PKG_VERSION"), &SKILL.info())
    }
}

impl Skill for Paragraph {
    fn info() -> SkillInfo {
        SKILL.info()
    }
}

selma_plugin_sdk::export!(skill: Paragraph);

#[cfg(test)]
mod tests {
    use super::*;
    use selma_plugin_sdk::templates::{distinct_prompts, validate_skill};
    use selma_plugin_sdk::text::word_count;

    #[test]
    fn skill_is_valid_and_templates_give_200_distinct_prompts() {
        let info = SKILL.info();
        assert_eq!(validate_skill(&info), Ok(()));
        let prompts = distinct_prompts(&info, 200, 1).unwrap();
        assert!(prompts.len() >= 200);
        // Paragraphs: every template filling has at least two sentences and 20 words.
        assert!(prompts
            .iter()
            .all(|p| word_count(p) >= 20 && p.matches(". ").count() >= 1));
    }
}
