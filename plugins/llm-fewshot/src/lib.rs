//! The `llm-fewshot` prompt generator: SELMA's prompt loop (Self-Instruct
//! style). Per request: sample 3 examples from the pool (seeds + accepted
//! prompts) with the host's seeded random source, write an instruction with
//! the skill's rules and the examples as a numbered list, ask the host LLM
//! for more, and parse the numbered lines of the reply.

use selma_plugin_sdk::rng::sample_k;
use selma_plugin_sdk::text::{clean, numbered_list, parse_numbered_list, word_count};
use selma_plugin_sdk::{
    info, llm, params, random, GenerateRequest, Metadata, Params, Plugin, PluginKind,
    PromptGenerator, SkillInfo,
};
use std::collections::HashSet;

struct LlmFewshot;

impl Plugin for LlmFewshot {
    fn metadata() -> Metadata {
        Metadata {
            name: "llm-fewshot".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kind: PluginKind::PromptGenerator,
            description: "Writes prompts with the host LLM from 3 examples sampled from the pool (SELMA).".into(),
            help: "Each of `requests` requests samples `examples` prompts from the pool (seeds + \
                   accepted) with the host's seeded random source, builds: the skill instruction, \
                   its rules (word limit, constraints), the examples as a numbered list, and asks \
                   for `prompts-per-request` more numbered lines. Replies are parsed as 'N. text' / \
                   'N) text' lines; duplicates, pool members and prompts over the skill's word \
                   limit are dropped. Needs the LLM grant for this plugin in the run config."
                .into(),
            params: vec![
                params::number("temperature", 1.0, "sampling temperature"),
                params::number("top-p", 1.0, "nucleus sampling top_p"),
                params::integer("max-tokens", 2048, "completion length limit per request"),
                params::integer("requests", 5, "LLM requests per generate call (each with fresh examples)"),
                params::integer("prompts-per-request", 20, "new prompts asked for in each request"),
                params::integer("examples", 3, "pool prompts shown as examples in each request"),
                params::text("system", "", "optional system message for chat endpoints (empty: none)"),
                params::boolean(
                    "enforce-max-words",
                    true,
                    "drop replies with at least the skill's max-words words",
                ),
            ],
        }
    }
}

/// The completion prompt for one request (pure).
pub fn build_prompt(skill: &SkillInfo, examples: &[&str], wanted: usize) -> String {
    let mut p = String::new();
    p.push_str(skill.rules.instruction.trim());
    p.push_str("\n\nRules:\n");
    p.push_str(&format!(
        "- Fewer than {} words each.\n",
        skill.rules.max_words
    ));
    for c in &skill.rules.constraints {
        p.push_str(&format!("- {}\n", c.trim()));
    }
    p.push_str(
        "- Every description must be new: different from the examples and from each other.\n",
    );
    p.push_str("\nExamples:\n");
    p.push_str(&numbered_list(examples));
    let first = examples.len() + 1;
    p.push_str(&format!(
        "\nWrite {wanted} new descriptions, numbered {first} to {}, one per line, with no other text.\n",
        examples.len() + wanted
    ));
    p
}

/// Strip the decorations LLMs add around an item: whitespace runs and
/// matching surrounding quotes.
pub fn tidy(item: &str) -> String {
    let s = clean(item);
    for (open, close) in [('"', '"'), ('\'', '\''), ('\u{201c}', '\u{201d}')] {
        if s.len() >= 2 && s.starts_with(open) && s.ends_with(close) {
            return clean(&s[open.len_utf8()..s.len() - close.len_utf8()]);
        }
    }
    s
}

/// Settings read from the parameters.
struct Settings {
    request: llm::CompletionRequest,
    requests: u32,
    per_request: usize,
    examples: usize,
    enforce_max_words: bool,
}

fn settings(params: &Params) -> Result<Settings, String> {
    let per_request = params.u32("prompts-per-request")? as usize;
    let examples = params.u32("examples")? as usize;
    if per_request == 0 || examples == 0 {
        return Err(
            "parameters \"prompts-per-request\" and \"examples\" must be at least 1".into(),
        );
    }
    let system = params.str("system")?;
    let mut request = llm::request("");
    request.system = (!system.is_empty()).then(|| system.to_string());
    request.temperature = params.f32("temperature")?;
    request.top_p = params.f32("top-p")?;
    request.max_tokens = params.u32("max-tokens")?;
    // Stop when the model starts the item after the last one asked for.
    request.stop = vec![format!("\n{}.", examples + per_request + 1)];
    Ok(Settings {
        request,
        requests: params.u32("requests")?,
        per_request,
        examples,
        enforce_max_words: params.bool("enforce-max-words")?,
    })
}

/// Keep the new, well-formed items of one reply (pure): tidied, not in
/// `seen` (lowercased; updated), and under the word limit if enforced.
pub fn accept_items(
    reply: &str,
    seen: &mut HashSet<String>,
    max_words: Option<usize>,
) -> Vec<String> {
    let mut out = Vec::new();
    for item in parse_numbered_list(reply) {
        let item = tidy(&item);
        if item.is_empty() || max_words.is_some_and(|m| word_count(&item) >= m) {
            continue;
        }
        if seen.insert(item.to_lowercase()) {
            out.push(item);
        }
    }
    out
}

impl PromptGenerator for LlmFewshot {
    fn generate(req: GenerateRequest) -> Result<Vec<String>, String> {
        let s = settings(&req.params)?;
        let pool: &[String] = if req.pool.is_empty() {
            &req.skill.seeds
        } else {
            &req.pool
        };
        if pool.is_empty() {
            return Err(format!(
                "skill \"{}\" has no seeds and the pool is empty",
                req.skill.id
            ));
        }
        let mut seen: HashSet<String> = pool.iter().map(|p| p.to_lowercase()).collect();
        let max_words = s
            .enforce_max_words
            .then_some(req.skill.rules.max_words as usize);
        let mut out = Vec::new();
        for r in 0..s.requests {
            let picks = sample_k(pool.len(), s.examples, &mut random::HostRng);
            let examples: Vec<&str> = picks.iter().map(|&i| pool[i].as_str()).collect();
            let mut request = s.request.clone();
            request.prompt = build_prompt(&req.skill, &examples, s.per_request);
            let replies = llm::complete(&request).map_err(|e| {
                format!(
                    "skill \"{}\", round {}, request {}: {e}",
                    req.skill.id,
                    req.round,
                    r + 1
                )
            })?;
            for reply in &replies {
                out.extend(accept_items(reply, &mut seen, max_words));
            }
        }
        info!(
            "skill \"{}\" round {}: {} candidates from {} requests",
            req.skill.id,
            req.round,
            out.len(),
            s.requests
        );
        Ok(out)
    }
}

selma_plugin_sdk::export!(prompt_generator: LlmFewshot);

#[cfg(test)]
mod tests {
    use super::*;
    use selma_plugin_sdk::{params::defaults, Rules};

    fn skill() -> SkillInfo {
        SkillInfo {
            id: "counting".into(),
            description: "d".into(),
            seeds: vec!["a".into(), "b".into(), "c".into()],
            rules: Rules {
                max_words: 30,
                constraints: vec!["Counts at most three.".into()],
                instruction: "Write image descriptions.".into(),
            },
            templates: None,
        }
    }

    #[test]
    fn prompt_has_instruction_rules_and_numbered_examples() {
        let p = build_prompt(&skill(), &["Two cats.", "One dog.", "Three cups."], 20);
        assert!(p.starts_with("Write image descriptions.\n\nRules:\n- Fewer than 30 words each.\n"));
        assert!(p.contains("- Counts at most three.\n"));
        assert!(p.contains("Examples:\n1. Two cats.\n2. One dog.\n3. Three cups.\n"));
        assert!(p.contains("Write 20 new descriptions, numbered 4 to 23,"));
        // The examples parse back out of the prompt as a numbered list.
        assert_eq!(
            parse_numbered_list(&p),
            ["Two cats.", "One dog.", "Three cups."]
        );
    }

    #[test]
    fn reply_items_are_tidied_deduplicated_and_limited() {
        let mut seen: HashSet<String> = ["two cats.".to_string()].into();
        let reply = "4. \"A red ball on a mat.\"\n5. Two cats.\n6) a red ball on a mat.\n\
                     7. one two three four five six seven\nSure, here you go\n8. Three owls on a branch.";
        // "A red ball on a mat." has 6 words (< 7 kept); item 7 has 7 (dropped).
        let got = accept_items(reply, &mut seen, Some(7));
        assert_eq!(got, ["A red ball on a mat.", "Three owls on a branch."]);
        assert!(seen.contains("three owls on a branch."));
        let got = accept_items(
            "1. one two three four five six seven",
            &mut HashSet::new(),
            None,
        );
        assert_eq!(got.len(), 1);
    }

    #[test]
    fn settings_follow_the_defaults() {
        let s = settings(&defaults(&LlmFewshot::metadata().params)).unwrap();
        assert_eq!(s.requests, 5);
        assert_eq!(s.per_request, 20);
        assert_eq!(s.examples, 3);
        assert_eq!(s.request.temperature, 1.0);
        assert_eq!(s.request.top_p, 1.0);
        assert_eq!(s.request.system, None);
        assert_eq!(s.request.stop, ["\n24."]);
        assert!(s.enforce_max_words);
    }

    #[test]
    fn tidy_strips_matching_quotes_only() {
        assert_eq!(tidy("  \"A cat\"  "), "A cat");
        assert_eq!(tidy("\u{201c}A cat\u{201d}"), "A cat");
        assert_eq!(tidy("\"A cat"), "\"A cat");
        assert_eq!(tidy("'"), "'");
    }
}
