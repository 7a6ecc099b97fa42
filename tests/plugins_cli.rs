//! The plugin commands of the real `selma` binary (`plugins list`,
//! `inspect`, `new`) and the bundled plugins it ships. The sandbox itself
//! (hostile plugins, limits, the component cache, imports) is tested in
//! selma-runtime: host/crates/runtime/tests/sandbox.rs.

use crate::support::root;
use crate::support::runtime::{assert_good_plugin_works, small_runtime};

use selma_runtime::RgbImage;
use std::process::Command;

/// The real binary, with its component cache inside target/.
fn selma() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_selma"));
    c.env("SELMA_CACHE_DIR", root().join("target/selma-test-cache"));
    c
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
