//! End-to-end tests of `selma prompts`: the real binary, the bundled
//! plugins, and (for the LLM generator) a local mock OpenAI-compatible
//! endpoint from `selma_llm::test_server`.

use selma_llm::test_server::MockServer;
use serde_json::Value;
use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

fn selma(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_selma"))
        .args(args)
        .env_remove("SELMA_LLM_API_KEY")
        .output()
        .expect("run the selma binary")
}

fn check_ok(out: &Output) {
    assert!(
        out.status.success(),
        "selma failed\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The JSON objects of a prompts.jsonl file.
fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .expect("read prompts.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

fn texts(records: &[Value]) -> Vec<String> {
    records
        .iter()
        .map(|r| r["text"].as_str().expect("text is a string").to_string())
        .collect()
}

/// The bundled skill's definition, read through the runtime library.
fn skill_info(name: &str) -> selma_runtime::SkillInfo {
    let rt = selma_runtime::Runtime::new(selma_runtime::RuntimeConfig::default()).unwrap();
    rt.skill(name).unwrap().info().unwrap()
}

/// A made-up word unique to `i` (letters only, so ROUGE-L sees one token).
fn word(i: usize) -> String {
    const SYL: [&str; 16] = [
        "ka", "lo", "mi", "ne", "pu", "ra", "si", "to", "ve", "zu", "ba", "de", "fo", "gi", "ho",
        "ju",
    ];
    let mut s = String::from("q");
    let mut x = i;
    loop {
        s.push_str(SYL[x % 16]);
        x /= 16;
        if x == 0 {
            break;
        }
    }
    s
}

/// Mock LLM reply: numbered lines; fresh unique prompts, plus an exact
/// repeat and a near-duplicate (one extra word: ROUGE-L F1 = 16/17 > 0.8)
/// of prompts given earlier in the same reply. The near-duplicates are
/// recorded in `near_dups`.
fn reply(counter: &mut usize, near_dups: &Mutex<Vec<String>>) -> String {
    let mut lines: Vec<String> = Vec::new();
    for _ in 0..6 {
        let k = *counter;
        *counter += 1;
        lines.push(format!(
            "a photo of {} {} {} near the {}",
            word(4 * k),
            word(4 * k + 1),
            word(4 * k + 2),
            word(4 * k + 3)
        ));
    }
    let exact = lines[0].clone();
    let near = format!("{} today", lines[1]);
    near_dups.lock().unwrap().push(near.clone());
    lines.insert(3, exact);
    lines.push(near);
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| format!("{}. {l}", i + 1))
        .collect::<Vec<_>>()
        .join("\n")
}

/// One `selma prompts --generator llm-fewshot` run against a fresh mock
/// endpoint (two 429s first, Retry-After 0): the run's output, its prompts,
/// the near-duplicates the mock sent, and the mock itself.
fn fewshot_run(filters: &[&str], count: usize) -> (Output, Vec<Value>, Vec<String>, MockServer) {
    let repeats = Arc::new(Mutex::new(Vec::new()));
    let r = repeats.clone();
    let mut counter = 0usize;
    let server = MockServer::with_responder(move |_, _| reply(&mut counter, &r));
    server.fail_times(429, 2);
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("prompts.jsonl");
    let count = count.to_string();
    let base = server.base_url();
    let mut args = vec![
        "prompts",
        "--skill",
        "general",
        "--generator",
        "llm-fewshot",
        "--count",
        &count,
        "--out",
        out_path.to_str().unwrap(),
        "--llm-endpoint",
        &base,
        "--llm-model",
        "mock-model",
        "--quiet",
    ];
    for f in filters {
        args.extend(["--filter", f]);
    }
    let out = selma(&args);
    check_ok(&out);
    let records = read_jsonl(&out_path);
    let repeats = repeats.lock().unwrap().clone();
    (out, records, repeats, server)
}

#[test]
fn llm_fewshot_with_mock_endpoint_reaches_count_and_rejects_near_duplicates() {
    let count = 40;
    let (out, records, repeats, server) = fewshot_run(&["rouge-l"], count);
    let got = texts(&records);
    assert_eq!(got.len(), count);
    let distinct: HashSet<&String> = got.iter().collect();
    assert_eq!(distinct.len(), count, "duplicates in the output");
    // Exact repeats were sent too: the distinct count above covers them.
    assert!(!repeats.is_empty());
    for r in &repeats {
        assert!(!got.contains(r), "near-duplicate {r:?} was accepted");
    }
    // Every accepted prompt is one of the mock's fresh lines.
    for t in &got {
        assert!(t.starts_with("a photo of q"), "unexpected prompt {t:?}");
        assert!(!t.ends_with(" today"), "near-duplicate {t:?} accepted");
    }
    for rec in &records {
        assert_eq!(rec["skill"], "general");
        assert_eq!(rec["generator"], "llm-fewshot");
        assert!(rec["round"].as_u64().is_some());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("filter rouge-l:"), "{stderr}");

    // The requests carried the skill's rules and three examples of the pool.
    let info = skill_info("general");
    let requests = server.requests();
    assert!(requests.len() > 2);
    let first = requests[0].prompt_text();
    assert!(
        first.contains(info.rules.instruction.trim()),
        "instruction missing from {first}"
    );
    assert!(first.contains(&info.rules.max_words.to_string()), "{first}");
    for c in &info.rules.constraints {
        assert!(
            first.contains(c.trim()),
            "constraint {c:?} missing from {first}"
        );
    }
    let seeds_shown = info
        .seeds
        .iter()
        .filter(|s| first.contains(s.as_str()))
        .count();
    assert_eq!(seeds_shown, 3, "{first}");
    for req in &requests {
        let json = req.json.as_ref().unwrap();
        assert_eq!(json["model"], "mock-model");
        assert_eq!(req.path, "/v1/completions");
    }
}

#[test]
fn without_rouge_l_the_near_duplicates_get_through() {
    // Control for the test above: the near-duplicates are caught by the
    // filter, not by the generator or the host.
    let (_, records, repeats, _server) = fewshot_run(&[], 40);
    let got = texts(&records);
    assert_eq!(got.len(), 40);
    assert!(
        got.iter().any(|t| repeats.contains(t)),
        "no near-duplicate accepted without rouge-l: {got:?}"
    );
}

#[test]
fn template_generator_works_offline_within_the_word_limit() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("p.jsonl");
    let count = 25;
    let out = selma(&[
        "prompts",
        "--skill",
        "general",
        "--generator",
        "template",
        "--filter",
        "rouge-l",
        "--count",
        &count.to_string(),
        "--out",
        out_path.to_str().unwrap(),
        "--quiet",
    ]);
    check_ok(&out);
    let got = texts(&read_jsonl(&out_path));
    assert_eq!(got.len(), count);
    let distinct: HashSet<&String> = got.iter().collect();
    assert_eq!(distinct.len(), count);
    let max_words = skill_info("general").rules.max_words as usize;
    for t in &got {
        let n = t.split_whitespace().count();
        assert!(
            n > 0 && n < max_words,
            "{t:?} has {n} words (limit {max_words})"
        );
    }
}

#[test]
fn llm_fewshot_without_endpoint_names_the_plugin_and_the_grant() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("p.jsonl");
    let out = selma(&[
        "prompts",
        "--skill",
        "general",
        "--generator",
        "llm-fewshot",
        "--count",
        "5",
        "--out",
        out_path.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("llm-fewshot"), "{stderr}");
    assert!(stderr.contains("--llm-endpoint"), "{stderr}");
    assert!(!out_path.exists());
}

fn template_run(seed: &str, path: &Path) {
    let out = selma(&[
        "prompts",
        "--skill",
        "counting",
        "--generator",
        "template",
        "--filter",
        "rouge-l",
        "--count",
        "30",
        "--seed",
        seed,
        "--out",
        path.to_str().unwrap(),
        "--quiet",
    ]);
    check_ok(&out);
}

#[test]
fn same_seed_gives_the_same_file_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.jsonl");
    let b = dir.path().join("b.jsonl");
    let c = dir.path().join("c.jsonl");
    template_run("7", &a);
    template_run("7", &b);
    template_run("8", &c);
    let (a, b, c) = (
        std::fs::read(&a).unwrap(),
        std::fs::read(&b).unwrap(),
        std::fs::read(&c).unwrap(),
    );
    assert!(!a.is_empty());
    assert_eq!(a, b, "same seed, different output");
    assert_ne!(a, c, "the seed does not reach the generator");
}

#[test]
fn unknown_param_plugin_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = selma(&[
        "prompts",
        "--skill",
        "general",
        "--generator",
        "template",
        "--param",
        "nosuch.threshold=0.5",
        "--count",
        "3",
        "--out",
        dir.path().join("p.jsonl").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nosuch"), "{stderr}");
    assert!(stderr.contains("template"), "{stderr}");
}

#[test]
fn chat_endpoint_with_api_key_sends_the_header_and_never_prints_the_key() {
    let secret = "sk-e2e-SECRET-4242";
    let mut counter = 0usize;
    let near = Arc::new(Mutex::new(Vec::new()));
    let n = near.clone();
    let server = MockServer::with_responder(move |_, _| reply(&mut counter, &n));
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("p.jsonl");
    let base = server.base_url();
    let args = [
        "prompts",
        "--skill",
        "counting",
        "--generator",
        "llm-fewshot",
        "--filter",
        "rouge-l",
        "--count",
        "12",
        "--out",
        out_path.to_str().unwrap(),
        "--llm-endpoint",
        &base,
        "--llm-model",
        "chat-model",
        "--llm-chat",
        "--llm-api-key-env",
        "SELMA_TEST_LLM_KEY",
        "--quiet",
    ];
    let run = |key: &str| {
        Command::new(env!("CARGO_BIN_EXE_selma"))
            .args(args)
            .env("SELMA_TEST_LLM_KEY", key)
            .output()
            .unwrap()
    };
    let out = run(secret);
    check_ok(&out);
    assert_eq!(texts(&read_jsonl(&out_path)).len(), 12);
    let requests = server.requests();
    assert!(!requests.is_empty());
    for r in &requests {
        assert_eq!(r.path, "/v1/chat/completions");
        assert_eq!(
            r.header("authorization"),
            Some(format!("Bearer {secret}").as_str())
        );
        let messages = r.json.as_ref().unwrap()["messages"].as_array().unwrap();
        assert_eq!(messages.last().unwrap()["role"], "user");
    }

    // A server that keeps failing: the error names the status, not the key.
    server.fail_times(500, 10);
    let out = Command::new(env!("CARGO_BIN_EXE_selma"))
        .args(args)
        .args(["--llm-retries", "1"])
        .env("SELMA_TEST_LLM_KEY", secret)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("HTTP 500"), "{all}");
    assert!(!all.contains(secret), "the API key was printed: {all}");

    // An unset variable is named.
    let out = Command::new(env!("CARGO_BIN_EXE_selma"))
        .args(args)
        .env_remove("SELMA_TEST_LLM_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("SELMA_TEST_LLM_KEY"), "{stderr}");
}

#[test]
fn shortfall_is_an_error_unless_partial_is_allowed() {
    // One candidate per round (template.count=1), 10 rounds: 10 of 500.
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("p.jsonl");
    let base = [
        "prompts",
        "--skill",
        "counting",
        "--generator",
        "template",
        "--param",
        "template.count=1",
        "--count",
        "500",
        "--max-rounds",
        "10",
        "--out",
        out_path.to_str().unwrap(),
        "--quiet",
    ];
    let out = selma(&base);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("only 10 of 500"), "{stderr}");
    assert!(stderr.contains("--allow-partial"), "{stderr}");
    assert_eq!(read_jsonl(&out_path).len(), 10);

    let mut args = base.to_vec();
    args.push("--allow-partial");
    let out = selma(&args);
    check_ok(&out);
    assert_eq!(read_jsonl(&out_path).len(), 10);
}

/// A reply that depends only on the request's prompt and the choice index
/// (FNV-1a of both picks the words), so a resumed run that sends the same
/// requests as an unbroken one gets the same answers.
fn reply_of(request: &selma_llm::test_server::RecordedRequest, index: u32) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in request.prompt_text().bytes().chain(index.to_le_bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    (0..5)
        .map(|i| {
            let k = (h >> (i * 12)) as usize & 0xfff;
            format!(
                "{}. a photo of {} by the {}",
                i + 1,
                word(k),
                word(k + 4096)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn an_llm_failure_loses_no_accepted_prompt_and_the_rerun_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let run = |server: &MockServer, out: &Path| {
        let base = server.base_url();
        selma(&[
            "prompts",
            "--skill",
            "general",
            "--generator",
            "llm-fewshot",
            "--filter",
            "rouge-l",
            "--count",
            "60",
            "--out",
            out.to_str().unwrap(),
            "--llm-endpoint",
            &base,
            "--llm-model",
            "mock-model",
            "--llm-timeout",
            "1",
            "--llm-retries",
            "0",
            "--quiet",
        ])
    };
    // The unbroken run.
    let healthy = MockServer::with_responder(reply_of);
    let unbroken = dir.path().join("unbroken.jsonl");
    check_ok(&run(&healthy, &unbroken));
    let rounds = read_jsonl(&unbroken)
        .iter()
        .map(|r| r["round"].as_u64().unwrap())
        .max()
        .unwrap();
    let unbroken_requests = healthy.requests().len();
    assert!(
        rounds >= 2 && unbroken_requests > 6,
        "the run must span several rounds and more than 6 requests: {rounds} rounds, \
         {unbroken_requests} requests"
    );

    // The same job against a server that stalls past the timeout once, at
    // its 6th request: the run fails and keeps what it had accepted.
    let calls = Arc::new(Mutex::new(0usize));
    let c = calls.clone();
    let flaky = MockServer::with_responder(move |r, i| {
        if i == 0 {
            let mut n = c.lock().unwrap();
            *n += 1;
            if *n == 6 {
                std::thread::sleep(std::time::Duration::from_millis(2500));
            }
        }
        reply_of(r, i)
    });
    // Both servers must answer the same: the endpoint is part of the job,
    // so the flaky run writes to its own file, compared at the end.
    let out = dir.path().join("flaky.jsonl");
    let partial = dir.path().join("flaky.jsonl.partial.json");
    let first = run(&flaky, &out);
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(!first.status.success(), "the stall must fail the run");
    assert!(stderr.contains("timed out"), "{stderr}");
    assert!(
        stderr.contains("kept in") && stderr.contains("flaky.jsonl.partial.json"),
        "{stderr}"
    );
    assert!(!out.exists() && partial.exists());
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(&partial).unwrap()).unwrap();
    let kept = saved["state"]["records"].as_array().unwrap().len();
    assert!(kept > 0 && kept < 60, "{kept} prompts kept");

    // The rerun resumes (no request for the rounds already done) and ends
    // with the unbroken run's prompts, byte for byte.
    let before = flaky.requests().len();
    let second = run(&flaky, &out);
    check_ok(&second);
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("resuming at round"), "{stderr}");
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&unbroken).unwrap()
    );
    assert!(
        !partial.exists(),
        "the checkpoint is removed once the output is written"
    );
    let resumed_requests = flaky.requests().len() - before;
    assert!(
        resumed_requests < unbroken_requests,
        "{resumed_requests} requests after resuming, {unbroken_requests} unbroken"
    );
}
