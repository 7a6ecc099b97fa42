//! The `template` prompt generator: offline prompts from the skill's
//! templates. Draws pattern and slot values with a generator seeded from the
//! host's random source (reproducible per run), keeps prompts under the
//! skill's word limit and not already in the pool.

use selma_plugin_sdk::rng::SplitMix64;
use selma_plugin_sdk::templates::TemplateSet;
use selma_plugin_sdk::text::word_count;
use selma_plugin_sdk::{
    info, params, random, GenerateRequest, Metadata, Params, Plugin, PluginKind, PromptGenerator,
};
use std::collections::HashSet;

struct Template;

impl Plugin for Template {
    fn metadata() -> Metadata {
        Metadata {
            name: "template".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kind: PluginKind::PromptGenerator,
            description: "Fills the skill's templates offline (no LLM), seeded by the run.".into(),
            help: "Each draw picks a pattern uniformly, then each {slot} value uniformly, from a \
                   SplitMix64 seeded with one host random draw. Drafts with at least the skill's \
                   max-words words, or already in the pool (case-insensitive), are skipped. \
                   Returns up to `count` prompts (0: the host's wanted), trying at most \
                   `draws-per-prompt` times as many draws; fewer means the templates are \
                   nearly exhausted."
                .into(),
            params: vec![
                params::integer(
                    "count",
                    0,
                    "prompts per call (0: as many as the host wants)",
                ),
                params::integer("draws-per-prompt", 50, "draw budget per requested prompt"),
            ],
        }
    }
}

/// Up to `count` new prompts from `set` (pure apart from `rng`).
pub fn draw(
    set: &TemplateSet,
    pool: &[String],
    count: usize,
    max_words: usize,
    budget: usize,
    rng: &mut SplitMix64,
) -> Vec<String> {
    let mut seen: HashSet<String> = pool.iter().map(|p| p.to_lowercase()).collect();
    let mut out = Vec::new();
    for _ in 0..budget {
        if out.len() >= count {
            break;
        }
        let p = set.sample(rng);
        if word_count(&p) < max_words && seen.insert(p.to_lowercase()) {
            out.push(p);
        }
    }
    out
}

fn settings(params: &Params) -> Result<(u32, u32), String> {
    Ok((params.u32("count")?, params.u32("draws-per-prompt")?.max(1)))
}

impl PromptGenerator for Template {
    fn generate(req: GenerateRequest) -> Result<Vec<String>, String> {
        let (count, draws) = settings(&req.params)?;
        let templates = req.skill.templates.as_ref().ok_or_else(|| {
            format!(
                "skill \"{}\" has no templates; use the llm-fewshot generator for it",
                req.skill.id
            )
        })?;
        let set =
            TemplateSet::new(templates).map_err(|e| format!("skill \"{}\": {e}", req.skill.id))?;
        let count = if count > 0 { count } else { req.wanted.max(1) } as usize;
        let mut rng = SplitMix64::new(random::next_u64());
        let out = draw(
            &set,
            &req.pool,
            count,
            req.skill.rules.max_words as usize,
            count.saturating_mul(draws as usize),
            &mut rng,
        );
        if out.len() < count {
            info!(
                "skill \"{}\": templates gave {} of {count} new prompts (space of {} fillings nearly used up)",
                req.skill.id,
                out.len(),
                set.total()
            );
        }
        Ok(out)
    }
}

selma_plugin_sdk::export!(prompt_generator: Template);

#[cfg(test)]
mod tests {
    use super::*;
    use selma_plugin_sdk::params::defaults;
    use selma_plugin_sdk::templates::slot;
    use selma_plugin_sdk::Templates;

    fn set() -> TemplateSet {
        TemplateSet::new(&Templates {
            patterns: vec![
                "a {c} {a}".into(),
                "the {a} sleeps on a very long {c} mat".into(),
            ],
            slots: vec![
                slot("c", &["red", "blue", "green"]),
                slot("a", &["cat", "dog"]),
            ],
        })
        .unwrap()
    }

    #[test]
    fn draws_are_new_distinct_short_and_seeded() {
        let pool = vec!["A red cat".to_string()];
        let got = draw(&set(), &pool, 100, 5, 10_000, &mut SplitMix64::new(4));
        // Short pattern only (the long one has 8 words), minus the pooled prompt.
        assert_eq!(got.len(), 5);
        assert!(got.iter().all(|p| word_count(p) < 5 && p != "A red cat"));
        let again = draw(&set(), &pool, 100, 5, 10_000, &mut SplitMix64::new(4));
        assert_eq!(got, again);
        let three = draw(&set(), &[], 3, 30, 1000, &mut SplitMix64::new(1));
        assert_eq!(three.len(), 3);
    }

    #[test]
    fn default_settings() {
        assert_eq!(
            settings(&defaults(&Template::metadata().params)),
            Ok((0, 50))
        );
    }
}
