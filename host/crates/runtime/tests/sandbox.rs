//! The sandbox, end to end: hostile test plugins (tests/plugins/hostile-*,
//! built here from the SDK for wasm32-wasip2) that loop, exhaust memory,
//! panic or return huge values. Each must be stopped with an error naming
//! it, the same process must keep working, and the hostile instance must
//! work again after re-instantiation. Also kind and parameter checks, the
//! on-disk component cache and the log, random and llm imports.

use crate::support::shared::{assert_good_plugin_works, small_runtime};
use crate::support::test_plugin;

use selma_runtime::{ExpertLayer, MergedLayer, Runtime, RuntimeConfig};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The hostile filters behave well on ordinary input: keep candidates with
/// an even number of characters, reject the others with reason "odd".
fn assert_filter_works(p: &mut selma_runtime::PromptFilterPlugin) {
    let params = p.default_params();
    let v = p
        .filter(&strings(&["ab", "abc", "abcd"]), &[], &params)
        .unwrap();
    let keep: Vec<bool> = v.iter().map(|v| v.keep).collect();
    assert_eq!(keep, [true, false, true]);
    assert_eq!(v[1].reason.as_deref(), Some("odd"));
}

#[test]
fn hostile_loop_is_stopped_by_the_deadline_and_recovers() {
    let wasm = test_plugin("hostile-loop");
    let cache = tempfile::tempdir().unwrap();
    let rt = small_runtime(cache.path());
    let mut p = rt.prompt_filter(wasm.to_str().unwrap()).unwrap();
    assert_eq!(p.name(), "hostile-loop");
    assert_filter_works(&mut p);
    let params = p.default_params();
    let t0 = Instant::now();
    let err = p
        .filter(&strings(&["loop"]), &[], &params)
        .unwrap_err()
        .to_string();
    let took = t0.elapsed();
    assert!(
        err.contains("plugin \"hostile-loop\"") && err.contains("deadline of 1s exceeded"),
        "{err}"
    );
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(5),
        "stopped after {took:?}"
    );
    assert_filter_works(&mut p);
    assert_good_plugin_works(&rt);
}

#[test]
fn hostile_oom_is_stopped_by_the_memory_cap_and_recovers() {
    let wasm = test_plugin("hostile-oom");
    let cache = tempfile::tempdir().unwrap();
    let rt = small_runtime(cache.path());
    let mut p = rt.prompt_filter(wasm.to_str().unwrap()).unwrap();
    assert_filter_works(&mut p);
    let params = p.default_params();
    let err = p
        .filter(&strings(&["oom"]), &[], &params)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("plugin \"hostile-oom\"") && err.contains("out of memory (limit 64 MiB)"),
        "{err}"
    );
    assert_filter_works(&mut p);
    assert_good_plugin_works(&rt);
}

#[test]
fn hostile_panic_shows_the_panic_message_and_recovers() {
    let wasm = test_plugin("hostile-panic");
    let cache = tempfile::tempdir().unwrap();
    let rt = small_runtime(cache.path());
    let mut p = rt.prompt_filter(wasm.to_str().unwrap()).unwrap();
    assert_filter_works(&mut p);
    let params = p.default_params();
    let err = p
        .filter(&strings(&["panic"]), &[], &params)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("plugin \"hostile-panic\"")
            && err.contains("panicked: told to panic on \"panic\""),
        "{err}"
    );
    assert_filter_works(&mut p);
    assert_good_plugin_works(&rt);
}

#[test]
fn hostile_huge_return_is_refused_and_recovers() {
    let wasm = test_plugin("hostile-huge");
    let cache = tempfile::tempdir().unwrap();
    let rt = small_runtime(cache.path());
    let mut p = rt.prompt_filter(wasm.to_str().unwrap()).unwrap();
    assert_filter_works(&mut p);
    let params = p.default_params();
    // 8 MiB of verdict reasons against a 1 MiB output cap.
    let err = p
        .filter(&strings(&["huge"]), &[], &params)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("plugin \"hostile-huge\"")
            && err.contains("invalid return")
            && err.contains("1 MiB"),
        "{err}"
    );
    // A verdict count that does not match the candidates is refused (by
    // the SDK's adapter, and by the host if a plugin bypasses the SDK).
    let err = p
        .filter(&strings(&["short", "x"]), &[], &params)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("plugin \"hostile-huge\"") && err.contains("1 verdicts for 2 candidates"),
        "{err}"
    );
    assert_filter_works(&mut p);
    // Input above the input cap is refused before the call.
    let rt2 = Runtime::new(RuntimeConfig {
        max_input_bytes: 1000,
        cache_dir: Some(cache.path().to_path_buf()),
        log_to_stderr: false,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let mut p2 = rt2.prompt_filter(wasm.to_str().unwrap()).unwrap();
    let err = p2
        .filter(&["a".repeat(2000)], &[], &params)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("plugin \"hostile-huge\"") && err.contains("exceeds the limit of 1000 bytes"),
        "{err}"
    );
    assert_good_plugin_works(&rt);
}

#[test]
fn tensor_import_copies_are_capped_and_bad_tensors_are_refused() {
    use candle_core::{Device, Tensor};
    let wasm = test_plugin("hostile-tensor");
    let spec = wasm.to_str().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let rt = small_runtime(cache.path());
    let dev = Device::Cpu;
    let t = |v: &[f32], s: (usize, usize)| Tensor::from_slice(v, s, &dev).unwrap();
    // Case A of notes/merge-cases.md, computed inside the guest from copies.
    let experts = [
        ExpertLayer {
            up: t(&[1., 2.], (2, 1)),
            down: t(&[1., -1.], (1, 2)),
            scale: 2.0,
            weight: 0.5,
        },
        ExpertLayer {
            up: t(&[1., -1.], (2, 1)),
            down: t(&[3., 1.], (1, 2)),
            scale: 1.0,
            weight: 0.5,
        },
    ];
    let mut m = rt.merge_strategy(spec).unwrap();
    let copy = m.default_params();
    let MergedLayer::Delta(d) = m.merge_layer("l", &experts, None, &copy).unwrap() else {
        panic!("hostile-tensor returns a delta");
    };
    assert_eq!(d.to_vec2::<f32>().unwrap(), [[2.5, -0.5], [0.5, -2.5]]);

    let mode = |v: &str| m.params(&[("mode".into(), v.into())]).unwrap();
    let (bad, wrong, handles) = (mode("bad-shape"), mode("wrong-shape"), mode("handles"));
    let err = m
        .merge_layer("l", &experts, None, &bad)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("plugin \"hostile-tensor\"") && err.contains("needs"),
        "{err}"
    );
    let err = m
        .merge_layer("l", &experts, None, &wrong)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("plugin \"hostile-tensor\"")
            && err.contains("invalid return: delta has shape [1, 1], expected [2, 2]"),
        "{err}"
    );
    // The instance trapped on bad-shape and was replaced: it still works.
    assert!(m.merge_layer("l", &experts, None, &copy).is_ok());

    // Empty tensors without end: no bytes, but the handle cap stops them
    // (before it, they ran until the deadline, each handle host memory).
    let t0 = Instant::now();
    let err = m
        .merge_layer("l", &experts, None, &handles)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("plugin \"hostile-tensor\"")
            && err.contains("host handle limit of 65536 live tensors and images exceeded"),
        "{err}"
    );
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    // The instance and its handles are gone: the next call works.
    assert!(m.merge_layer("l", &experts, None, &copy).is_ok());

    // Copies out of the host are capped by max_input_bytes (a 64x64 f32
    // factor is 16 KiB > 1000 bytes).
    let rt = Runtime::new(RuntimeConfig {
        max_input_bytes: 1000,
        cache_dir: Some(cache.path().to_path_buf()),
        log_to_stderr: false,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let big = [ExpertLayer {
        up: Tensor::ones((64, 64), candle_core::DType::F32, &dev).unwrap(),
        down: Tensor::ones((64, 64), candle_core::DType::F32, &dev).unwrap(),
        scale: 1.0,
        weight: 1.0,
    }];
    let mut m = rt.merge_strategy(spec).unwrap();
    let err = m
        .merge_layer("l", &big, None, &copy)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("plugin \"hostile-tensor\"")
            && err.contains("to-list refused")
            && err.contains("1000 bytes"),
        "{err}"
    );
}

#[test]
fn wrong_kind_and_bad_params_are_refused_before_any_call() {
    let wasm = test_plugin("hostile-panic");
    let cache = tempfile::tempdir().unwrap();
    let rt = small_runtime(cache.path());
    let spec = wasm.to_str().unwrap();
    let err = format!("{:#}", rt.merge_strategy(spec).err().unwrap());
    assert!(
        err.contains(spec) && err.contains("is a prompt-filter plugin"),
        "{err}"
    );
    let p = rt.prompt_filter(spec).unwrap();
    let err = p
        .params(&[("nope".into(), "1".into())])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("plugin \"hostile-panic\"") && err.contains("\"nope\""),
        "{err}"
    );
}

#[test]
fn compiled_components_are_cached_on_disk_and_bad_entries_recompiled() {
    let wasm = test_plugin("hostile-panic");
    let cache = tempfile::tempdir().unwrap();
    let spec = wasm.to_str().unwrap();
    {
        let rt = small_runtime(cache.path());
        rt.inspect(spec).unwrap();
    }
    let entries: Vec<PathBuf> = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    // A corrupted entry is ignored, recompiled and replaced.
    std::fs::write(&entries[0], b"garbage").unwrap();
    let rt = small_runtime(cache.path());
    let mut p = rt.prompt_filter(spec).unwrap();
    assert_filter_works(&mut p);
    assert!(std::fs::metadata(&entries[0]).unwrap().len() > 1000);
}

/// Records every request; answers with two numbered lines after `delay`.
struct FakeLlm {
    seen: Mutex<Vec<selma_runtime::CompletionRequest>>,
    delay: Duration,
}

impl selma_runtime::LlmBackend for FakeLlm {
    fn complete(&self, req: &selma_runtime::CompletionRequest) -> anyhow::Result<Vec<String>> {
        std::thread::sleep(self.delay);
        self.seen.lock().unwrap().push(req.clone());
        Ok(vec![
            "1. a red cube\n2. two blue balls".to_string();
            req.n as usize
        ])
    }
}

#[test]
fn imports_log_random_and_llm_follow_seed_and_grants() {
    let wasm = test_plugin("hostile-probe");
    let spec = wasm.to_str().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let llm = Arc::new(FakeLlm {
        seen: Mutex::new(Vec::new()),
        delay: Duration::from_millis(1500),
    });
    let make = |seed: u64, grants: Vec<String>| {
        Runtime::new(RuntimeConfig {
            seed,
            llm: Some(llm.clone()),
            llm_grants: grants,
            call_timeout: Duration::from_secs(1),
            cache_dir: Some(cache.path().to_path_buf()),
            log_to_stderr: false,
            ..RuntimeConfig::default()
        })
        .unwrap()
    };
    let skill = selma_runtime::SkillInfo {
        id: "counting".into(),
        description: "counts".into(),
        seeds: strings(&["one cat", "two dogs", "three birds"]),
        rules: selma_runtime::Rules {
            max_words: 30,
            constraints: vec![],
            instruction: "write".into(),
        },
        templates: None,
    };
    let draws = |rt: &Runtime| {
        let mut g = rt.generator(spec).unwrap();
        let params = g.params(&[("use-llm".into(), "false".into())]).unwrap();
        g.generate(&skill, &[], 3, 0, &params).unwrap()
    };
    // Same run seed and name: same numbers; another run seed: others.
    let rt = make(7, vec![]);
    let a = draws(&rt);
    assert_eq!(a.len(), 3);
    assert_eq!(a, draws(&make(7, vec![])));
    assert_ne!(a, draws(&make(8, vec![])));
    // Log lines are attributed to the plugin.
    let logs = rt.drain_logs();
    assert!(
        logs.iter()
            .any(|l| l.plugin == "hostile-probe" && l.message == "round 0, wanted 3"),
        "{logs:?}"
    );

    // Not granted: the guest sees an error telling how to grant it.
    let mut g = rt.generator(spec).unwrap();
    let params = g.default_params();
    let err = g
        .generate(&skill, &[], 2, 0, &params)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("plugin \"hostile-probe\"")
            && err.contains("[plugins.hostile-probe] grants = [\"llm\"]"),
        "{err}"
    );
    assert!(llm.seen.lock().unwrap().is_empty());

    // Granted: the backend gets the request; the 1.5 s the LLM takes does
    // not count against the 1 s deadline.
    let rt = make(7, vec!["hostile-probe".into()]);
    let mut g = rt.generator(spec).unwrap();
    let out = g
        .generate(&skill, &strings(&["pooled"]), 2, 1, &params)
        .unwrap();
    assert_eq!(out, strings(&["a red cube", "two blue balls"]));
    let seen = llm.seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].prompt.contains("one cat") && seen[0].prompt.contains("pooled"),
        "{:?}",
        seen[0]
    );
}

/// A plugin that keeps asking the LLM: the waits are excluded from the
/// deadline but not unbounded; their sum per call has its own limit, a
/// trap the guest cannot ignore, naming the plugin. The next call works.
#[test]
fn a_plugin_that_keeps_asking_the_llm_is_stopped() {
    let wasm = test_plugin("hostile-probe");
    let cache = tempfile::tempdir().unwrap();
    let llm = Arc::new(FakeLlm {
        seen: Mutex::new(Vec::new()),
        delay: Duration::from_millis(20),
    });
    let rt = Runtime::new(RuntimeConfig {
        llm: Some(llm.clone()),
        llm_grants: vec!["hostile-probe".into()],
        call_timeout: Duration::from_secs(5),
        llm_wait_limit: Duration::from_millis(400),
        cache_dir: Some(cache.path().to_path_buf()),
        log_to_stderr: false,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let skill = selma_runtime::SkillInfo {
        id: "s".into(),
        description: "s".into(),
        seeds: strings(&["a", "b", "c"]),
        rules: selma_runtime::Rules {
            max_words: 30,
            constraints: vec![],
            instruction: "write".into(),
        },
        templates: None,
    };
    let mut g = rt.generator(wasm.to_str().unwrap()).unwrap();
    let p = g.params(&[("llm-loop".into(), "true".into())]).unwrap();
    let t0 = Instant::now();
    let err = g.generate(&skill, &[], 1, 0, &p).unwrap_err().to_string();
    assert!(
        err.contains("plugin \"hostile-probe\"") && err.contains("llm wait limit of 0.4s"),
        "{err}"
    );
    let asked = llm.seen.lock().unwrap().len();
    assert!((10..=21).contains(&asked), "{asked} requests");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    // The limit is per call: the next call asks again and works.
    let p = g.default_params();
    assert_eq!(g.generate(&skill, &[], 1, 0, &p).unwrap().len(), 2);
}

/// A flood of host calls in one call (150,000 log lines and random
/// draws) finishes within the deadline; the log keeps 100,000 lines and
/// says how many it dropped, naming the plugin; the next call works. A
/// flood without end is stopped by the deadline; attempts to reach files,
/// environment or network fail inside the guest; unbounded recursion is
/// named as a stack overflow.
#[test]
fn floods_recursion_and_escape_attempts_are_contained() {
    let wasm = test_plugin("hostile-probe");
    let cache = tempfile::tempdir().unwrap();
    let with_deadline = |d: Duration| {
        Runtime::new(RuntimeConfig {
            cache_dir: Some(cache.path().to_path_buf()),
            call_timeout: d,
            log_to_stderr: false,
            ..RuntimeConfig::default()
        })
        .unwrap()
    };
    let rt = with_deadline(Duration::from_secs(20));
    let skill = selma_runtime::SkillInfo {
        id: "s".into(),
        description: "s".into(),
        seeds: vec![],
        rules: selma_runtime::Rules {
            max_words: 30,
            constraints: vec![],
            instruction: "write".into(),
        },
        templates: None,
    };
    let mut g = rt.generator(wasm.to_str().unwrap()).unwrap();
    let flood = |g: &selma_runtime::GeneratorPlugin, n: &str| {
        g.params(&[
            ("use-llm".into(), "false".into()),
            ("flood".into(), n.into()),
        ])
        .unwrap()
    };
    let p = flood(&g, "150000");
    assert_eq!(g.generate(&skill, &[], 2, 0, &p).unwrap().len(), 2);
    let logs = rt.drain_logs();
    assert_eq!(logs.len(), 100_001, "kept lines plus one notice");
    let last = logs.last().unwrap();
    assert_eq!(last.plugin, "hostile-probe");
    assert_eq!(last.level, selma_runtime::LogLevel::Warn);
    assert!(
        last.message
            .starts_with("50001 further log line(s) dropped"),
        "{}",
        last.message
    );
    // Drained: the next call logs again, without a notice.
    let p = flood(&g, "3");
    g.generate(&skill, &[], 1, 0, &p).unwrap();
    assert_eq!(rt.drain_logs().len(), 4);

    // Without end (as good as): the deadline stops it, naming the plugin.
    let short = with_deadline(Duration::from_millis(500));
    let mut g = short.generator(wasm.to_str().unwrap()).unwrap();
    let p = flood(&g, "100000000000");
    let err = g.generate(&skill, &[], 1, 0, &p).unwrap_err().to_string();
    assert!(
        err.contains("plugin \"hostile-probe\"") && err.contains("deadline"),
        "{err}"
    );
    assert!(short.drain_logs().len() <= 100_001);
    let p = flood(&g, "0");
    assert_eq!(g.generate(&skill, &[], 1, 0, &p).unwrap().len(), 1);

    // Files, environment, sockets, name lookup: every attempt is refused
    // inside the sandbox (no preopened folder, no variables, no network).
    let p = g
        .params(&[
            ("use-llm".into(), "false".into()),
            ("escape".into(), "true".into()),
        ])
        .unwrap();
    let got = g.generate(&skill, &[], 1, 0, &p).unwrap();
    assert_eq!(got.len(), 9, "{got:?}");
    for line in &got {
        assert!(line.contains(": denied ("), "escaped: {line}");
    }
    eprintln!("escape attempts: {got:#?}");

    // Unbounded recursion: reported as a stack overflow, naming the plugin;
    // the next call works.
    let p = g
        .params(&[
            ("use-llm".into(), "false".into()),
            ("recurse".into(), "true".into()),
        ])
        .unwrap();
    let err = g.generate(&skill, &[], 1, 0, &p).unwrap_err().to_string();
    assert!(
        err.contains("plugin \"hostile-probe\"") && err.contains("stack overflow"),
        "{err}"
    );
    let p = flood(&g, "0");
    assert_eq!(g.generate(&skill, &[], 1, 0, &p).unwrap().len(), 1);
}

/// Image-filter scores outside [0, 1] (and NaN) are errors naming the
/// plugin, never clamped; a score inside passes through; the instance keeps
/// working after a refused call.
#[test]
fn image_filter_scores_outside_zero_one_are_errors() {
    let wasm = test_plugin("hostile-score");
    let cache = tempfile::tempdir().unwrap();
    let rt = small_runtime(cache.path());
    let mut f = rt.image_filter(wasm.to_str().unwrap()).unwrap();
    let img = selma_runtime::RgbImage {
        width: 2,
        height: 2,
        pixels: vec![128; 12],
        non_finite: 0.0,
    };
    let with = |f: &selma_runtime::ImageFilterPlugin, s: &str| {
        f.params(&[("score".into(), s.into())]).unwrap()
    };
    for s in ["0", "0.25", "1"] {
        let p = with(&f, s);
        let v = f.check(&img, "x", &p).unwrap();
        assert_eq!(v.score, s.parse::<f32>().unwrap());
    }
    for s in ["1.5", "-0.1", "1e39"] {
        let p = with(&f, s);
        let err = f.check(&img, "x", &p).unwrap_err().to_string();
        assert!(
            err.contains("plugin \"hostile-score\"") && err.contains("[0, 1]"),
            "{s}: {err}"
        );
    }
    let p = with(&f, "0.5");
    assert_eq!(f.check(&img, "x", &p).unwrap().score, 0.5);
    assert_good_plugin_works(&rt);
}
