//! Test-only prompt generator that probes the host imports: it logs, draws
//! from the seeded `random` source (param `use-llm = false`: returns
//! `wanted` draws as strings) or asks the `llm` import for a numbered list
//! built from the skill's seeds and the pool (`use-llm = true`, default).

use selma_plugin_sdk::{
    llm, params, random, text, GenerateRequest, Metadata, Plugin, PluginKind, PromptGenerator,
};

struct Probe;

impl Plugin for Probe {
    fn metadata() -> Metadata {
        Metadata {
            name: "hostile-probe".into(),
            version: "0.1.0".into(),
            kind: PluginKind::PromptGenerator,
            description: "Probes the log, random and llm imports (test only).".into(),
            help: String::new(),
            params: vec![params::boolean(
                "use-llm",
                true,
                "ask the llm instead of drawing numbers",
            )],
        }
    }
}

impl PromptGenerator for Probe {
    fn generate(req: GenerateRequest) -> Result<Vec<String>, String> {
        selma_plugin_sdk::log::info(format!("round {}, wanted {}", req.round, req.wanted));
        if !req.params.bool("use-llm")? {
            return Ok((0..req.wanted)
                .map(|_| random::next_u64().to_string())
                .collect());
        }
        let mut prompt = String::from("Examples:\n");
        for (i, p) in req.skill.seeds.iter().chain(req.pool.iter()).enumerate() {
            prompt.push_str(&format!("{}. {p}\n", i + 1));
        }
        let replies = llm::complete(&llm::request(prompt))?;
        Ok(replies
            .iter()
            .flat_map(|r| text::parse_numbered_list(r))
            .collect())
    }
}

selma_plugin_sdk::export!(prompt_generator: Probe);
