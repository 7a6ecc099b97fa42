//! End-to-end tests of the plugin runtime: the bundled plugins through the
//! real `selma` binary, and hostile test plugins (tests/plugins/hostile-*,
//! built here from the SDK for wasm32-wasip2) that loop, exhaust memory,
//! panic or return huge values. Each must be stopped with an error naming
//! it, the same process must keep working, and the hostile instance must
//! work again after re-instantiation.

mod support;

use support::{root, test_plugin};

use selma_runtime::{ExpertLayer, MergedLayer, RgbImage, Runtime, RuntimeConfig};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The real binary, with its component cache inside target/.
fn selma() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_selma"));
    c.env("SELMA_CACHE_DIR", root().join("target/selma-test-cache"));
    c
}

/// A runtime with small limits and its own cache folder.
fn small_runtime(cache: &Path) -> Runtime {
    Runtime::new(RuntimeConfig {
        memory_limit: 64 << 20,
        call_timeout: Duration::from_secs(1),
        max_output_bytes: 1 << 20,
        cache_dir: Some(cache.to_path_buf()),
        log_to_stderr: false,
        ..RuntimeConfig::default()
    })
    .unwrap()
}

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

/// The bundled `linear` merge on case A of notes/merge-cases.md: the
/// product of the returned factors is the weighted sum of deltas.
fn assert_good_plugin_works(rt: &Runtime) {
    use candle_core::{Device, Tensor};
    let dev = Device::Cpu;
    let t = |v: &[f32], s: (usize, usize)| Tensor::from_slice(v, s, &dev).unwrap();
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
    let mut m = rt.merge_strategy("linear").expect("bundled linear merge");
    let params = m.default_params();
    let delta = match m
        .merge_layer("unet.x.to_q", &experts, None, &params)
        .unwrap()
    {
        MergedLayer::Factors { up, down } => up.matmul(&down).unwrap(),
        MergedLayer::Delta(d) => d,
    };
    let got: Vec<Vec<f32>> = delta.to_vec2().unwrap();
    let want = [[2.5f32, -0.5], [0.5, -2.5]];
    for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
        assert!(
            (g - w).abs() < 1e-5,
            "linear merge gave {got:?}, want {want:?}"
        );
    }
}

#[test]
fn bundled_plugins_load_and_list_by_kind() {
    let out = selma()
        .args(["plugins", "list", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let list = list.as_array().expect("a JSON array");
    let count = |k: &str| list.iter().filter(|m| m["kind"] == k).count();
    assert_eq!(count("skill"), 9, "{list:#?}");
    assert_eq!(count("prompt-generator"), 2, "{list:#?}");
    assert_eq!(count("prompt-filter"), 3, "{list:#?}");
    assert_eq!(count("image-filter"), 2, "{list:#?}");
    assert_eq!(count("merge-strategy"), 6, "{list:#?}");
    for m in list {
        assert!(m["name"].as_str().is_some_and(|n| !n.is_empty()), "{m}");
        assert!(m["version"].as_str().is_some_and(|v| !v.is_empty()), "{m}");
        assert!(
            m["description"].as_str().is_some_and(|d| !d.is_empty()),
            "{m}"
        );
    }

    // Every bundled plugin loads through the library as its own kind and
    // answers metadata whose name is its registry name.
    let cache = tempfile::tempdir().unwrap();
    let rt = small_runtime(cache.path());
    assert_eq!(rt.bundled_names().len(), list.len());
    for name in rt.bundled_names() {
        let meta = rt.inspect(name).unwrap();
        assert_eq!(meta.name, name);
        assert_eq!(rt.kind_of(name).unwrap(), meta.kind);
    }
    let mut skill = rt.skill("counting").unwrap();
    let info = skill.info().unwrap();
    assert!(info.seeds.len() >= 3);
    assert_good_plugin_works(&rt);

    // The image filter sees host images through the `image` resource: a
    // constant grey image is degenerate, uniform noise is not.
    let mut f = rt.image_filter("degenerate").unwrap();
    let params = f.default_params();
    let (w, h) = (64u32, 48u32);
    let flat = RgbImage {
        width: w,
        height: h,
        pixels: vec![128; (w * h * 3) as usize],
        non_finite: 0.0,
    };
    assert!(!f.check(&flat, "a grey wall", &params).unwrap().keep);
    let mut state = 12345u32;
    let noise: Vec<u8> = (0..w * h * 3)
        .map(|_| {
            state = state.wrapping_mul(1664525).wrapping_add(1013904223);
            (state >> 24) as u8
        })
        .collect();
    let noisy = RgbImage {
        width: w,
        height: h,
        pixels: noise,
        non_finite: 0.0,
    };
    let v = f.check(&noisy, "static", &params).unwrap();
    assert!(v.keep && (0.0..=1.0).contains(&v.score), "{v:?}");
    let broken = RgbImage {
        non_finite: 0.5,
        ..noisy
    };
    assert!(!f.check(&broken, "static", &params).unwrap().keep);

    // The text table shows the same plugins.
    let out = selma().args(["plugins", "list"]).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    for m in list {
        assert!(text.contains(m["name"].as_str().unwrap()), "{text}");
    }
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
    let (bad, wrong) = (mode("bad-shape"), mode("wrong-shape"));
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
fn non_component_files_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("notes.wasm");
    std::fs::write(&text, "this is not wasm").unwrap();
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\x00\x00\x00").unwrap();
    let rt = small_runtime(dir.path());
    for (file, what) in [
        (&text, "not a WebAssembly component"),
        (&core, "core WebAssembly module"),
    ] {
        let spec = file.to_str().unwrap();
        let err = format!("{:#}", rt.merge_strategy(spec).err().expect("must fail"));
        assert!(err.contains(spec) && err.contains(what), "{err}");
        // And through the CLI.
        let out = selma().args(["plugins", "inspect", spec]).output().unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(spec) && stderr.contains(what), "{stderr}");
    }
    let err = format!("{:#}", rt.skill("no-such-plugin").err().unwrap());
    assert!(
        err.contains("no bundled plugin named \"no-such-plugin\""),
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

#[test]
fn scaffolded_plugins_build_and_load() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let rt = small_runtime(cache.path());
    for kind in ["merge-strategy", "prompt-filter"] {
        let name = format!("my-{kind}");
        let crate_dir = dir.path().join(&name);
        let out = selma()
            .args(["plugins", "new", kind, &name, "--dir"])
            .arg(&crate_dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(crate_dir.join("README.md").is_file());
        let build = Command::new(env!("CARGO"))
            .args([
                "build",
                "--release",
                "--target",
                "wasm32-wasip2",
                "--manifest-path",
            ])
            .arg(crate_dir.join("Cargo.toml"))
            .arg("--target-dir")
            .arg(root().join("target/wasm-test-plugins"))
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_MAKEFLAGS")
            .output()
            .unwrap();
        assert!(
            build.status.success(),
            "{}",
            String::from_utf8_lossy(&build.stderr)
        );
        let wasm = root()
            .join("target/wasm-test-plugins/wasm32-wasip2/release")
            .join(format!("{}.wasm", name.replace('-', "_")));
        let meta = rt.inspect(wasm.to_str().unwrap()).unwrap();
        assert_eq!(meta.name, name);
        assert_eq!(meta.kind.as_str(), kind);
    }
}
