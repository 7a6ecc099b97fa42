//! The `real-users` skill: prompts written the way people type them into
//! image generators, a subject followed by piles of style, lighting, medium
//! and quality tags (what DiffusionDB-style prompts teach).

use selma_plugin_sdk::skill::StaticSkill;
use selma_plugin_sdk::{Metadata, Plugin, Skill, SkillInfo};

/// The skill's constants (our own wording).
pub const SKILL: StaticSkill = StaticSkill {
    id: "real-users",
    description: "User-style prompts dense with style, medium, lighting and quality details.",
    seeds: &[
        "portrait of an elderly fisherman with a weathered face, oil painting, dramatic rim \
         lighting, highly detailed, muted colors",
        "a cozy cabin in a snowy pine forest at night, warm light in the windows, digital art, \
         4k, cinematic",
        "cyberpunk street market in the rain, neon signs reflected in puddles, crowded, ultra \
         detailed, wide angle",
    ],
    max_words: 50,
    constraints: &[
        "Write like people who type prompts into image generators: a subject first, then \
         comma-separated details.",
        "Pile on descriptors of style, medium, lighting, mood, color and quality.",
        "Do not name real artists or real people.",
    ],
    instruction: "You write prompts the way enthusiastic users of text-to-image tools do: a \
        vivid subject followed by a comma-separated list of details about style, medium, \
        lighting, mood, colors and image quality.",
    patterns: &[
        "{subject}, {setting}, {medium}, {lighting}, {quality}",
        "{subject} {setting}, {mood}, {medium}, {palette}, {quality}",
        "portrait of {person}, {medium}, {lighting}, {palette}, {quality}",
        "{subject}, {medium}, {mood}, {lighting}, {quality}, {lens}",
    ],
    slots: &[
        (
            "subject",
            &[
                "a giant ancient tree",
                "a steampunk airship",
                "a lone astronaut",
                "a fox spirit",
                "a floating castle",
                "a vintage sports car",
                "a dragon made of clouds",
                "a lighthouse",
                "a samurai robot",
                "a witch's cottage",
            ],
        ),
        (
            "setting",
            &[
                "in a misty valley",
                "on an alien planet",
                "above a stormy sea",
                "in a neon city",
                "in a field of sunflowers",
                "at the edge of the world",
            ],
        ),
        (
            "medium",
            &[
                "oil painting",
                "watercolor",
                "digital art",
                "concept art",
                "3d render",
                "ink illustration",
                "photograph",
                "pixel art",
            ],
        ),
        (
            "lighting",
            &[
                "golden hour",
                "volumetric lighting",
                "soft diffused light",
                "dramatic rim light",
                "moonlight",
                "studio lighting",
            ],
        ),
        (
            "quality",
            &[
                "highly detailed",
                "8k",
                "sharp focus",
                "intricate details",
                "masterpiece",
                "trending on artstation",
            ],
        ),
        (
            "mood",
            &[
                "dreamy",
                "melancholic",
                "epic",
                "whimsical",
                "eerie",
                "serene",
            ],
        ),
        (
            "palette",
            &[
                "pastel colors",
                "vibrant colors",
                "muted earth tones",
                "black and white",
                "teal and orange",
            ],
        ),
        (
            "person",
            &[
                "an old sailor with a white beard",
                "a young queen in silver armor",
                "a street musician",
                "a tired detective",
                "a smiling baker",
            ],
        ),
        (
            "lens",
            &[
                "wide angle",
                "85mm lens",
                "bokeh",
                "isometric view",
                "close-up",
            ],
        ),
    ],
};

struct RealUsers;

impl Plugin for RealUsers {
    fn metadata() -> Metadata {
        SKILL.metadata(env!("CARGO_PKG_VERSION"), &SKILL.info())
    }
}

impl Skill for RealUsers {
    fn info() -> SkillInfo {
        SKILL.info()
    }
}

selma_plugin_sdk::export!(skill: RealUsers);

#[cfg(test)]
mod tests {
    use super::*;
    use selma_plugin_sdk::templates::{distinct_prompts, validate_skill};

    #[test]
    fn skill_is_valid_and_templates_give_200_distinct_prompts() {
        let info = SKILL.info();
        assert_eq!(validate_skill(&info), Ok(()));
        let prompts = distinct_prompts(&info, 200, 1).unwrap();
        assert!(prompts.len() >= 200);
        // User style: a subject then at least four comma-separated details.
        assert!(prompts.iter().all(|p| p.matches(", ").count() >= 4));
    }
}
