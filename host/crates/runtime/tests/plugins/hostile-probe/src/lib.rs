//! Test-only prompt generator that probes the host imports: it logs, draws
//! from the seeded `random` source (param `use-llm = false`: returns
//! `wanted` draws as strings) or asks the `llm` import for a numbered list
//! built from the skill's seeds and the pool (`use-llm = true`, default).
//! `flood = N` first makes N log calls and N random draws (a flood of host
//! calls in one call). `recurse = true` recurses without end (each frame
//! holds a 1 KiB array, as real code does), overrunning the stack.
//! `escape = true` tries the WASI file system, environment, sockets and
//! name lookup, and returns what each attempt got. `llm-loop = true` asks
//! the `llm` import again and again without end, ignoring its errors.

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
            params: vec![
                params::boolean("use-llm", true, "ask the llm instead of drawing numbers"),
                params::integer("flood", 0, "log lines and random draws made first"),
                params::boolean("recurse", false, "recurse without end"),
                params::boolean("escape", false, "try files, environment and network"),
                params::boolean("llm-loop", false, "ask the llm without end"),
            ],
        }
    }
}

/// Err(`none`) when `n` is 0, else Ok(n).
fn none_or_count(n: usize, none: &'static str) -> Result<usize, &'static str> {
    if n == 0 {
        Err(none)
    } else {
        Ok(n)
    }
}

/// One line per attempt: `what: ok ...` or `what: denied (error)`.
fn escape() -> Vec<String> {
    fn line<T: std::fmt::Debug, E: std::fmt::Display>(what: &str, r: Result<T, E>) -> String {
        match r {
            Ok(v) => format!("{what}: ok {v:?}"),
            Err(e) => format!("{what}: denied ({e})"),
        }
    }
    use std::net::ToSocketAddrs;
    vec![
        line("read_dir /", std::fs::read_dir("/").map(|d| d.count())),
        line(
            "read /etc/passwd",
            std::fs::read("/etc/passwd").map(|b| b.len()),
        ),
        line("read_dir .", std::fs::read_dir(".").map(|d| d.count())),
        line("write x", std::fs::write("x", b"x")),
        line(
            "env",
            none_or_count(std::env::vars().count(), "no variables"),
        ),
        line("args", none_or_count(std::env::args().count(), "no args")),
        line(
            "tcp 127.0.0.1:22",
            std::net::TcpStream::connect("127.0.0.1:22").map(|_| ()),
        ),
        line(
            "udp bind",
            std::net::UdpSocket::bind("0.0.0.0:0").map(|_| ()),
        ),
        line(
            "lookup localhost",
            "localhost:80".to_socket_addrs().map(|a| a.count()),
        ),
    ]
}

/// Never returns: each frame keeps a 1 KiB array on the stack.
fn deeper(depth: u64) -> u64 {
    let mut frame = [0u8; 1024];
    frame[(depth % 1024) as usize] = depth as u8;
    let frame = std::hint::black_box(frame);
    deeper(depth + 1) + frame[(depth * 7 % 1024) as usize] as u64
}

impl PromptGenerator for Probe {
    fn generate(req: GenerateRequest) -> Result<Vec<String>, String> {
        if req.params.bool("escape")? {
            return Ok(escape());
        }
        if req.params.bool("llm-loop")? {
            loop {
                let _ = llm::complete(&llm::request("Again?".to_string()));
            }
        }
        if req.params.bool("recurse")? {
            return Ok(vec![deeper(0).to_string()]);
        }
        selma_plugin_sdk::log::info(format!("round {}, wanted {}", req.round, req.wanted));
        let mut x = 0u64;
        for i in 0..req.params.i64("flood")? {
            selma_plugin_sdk::log::debug(format!("flood {i}"));
            x ^= random::next_u64();
        }
        if x == 1 {
            selma_plugin_sdk::log::info("a rare draw");
        }
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
