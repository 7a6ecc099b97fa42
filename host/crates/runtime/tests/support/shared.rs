//! Plugin helpers shared with the selma crate's integration tests (its
//! tests/support/mod.rs includes this file by path): building a test-only
//! plugin crate for wasm32-wasip2, a runtime with small limits, and a check
//! that a bundled plugin still works.
#![allow(dead_code)] // each test binary uses a different subset

use selma_runtime::{ExpertLayer, MergedLayer, Runtime, RuntimeConfig};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// Builds the plugin crate at `crate_dir` for wasm32-wasip2 into
/// `target_dir` (once per test process) and returns its .wasm.
pub fn build_plugin(crate_dir: &Path, target_dir: &Path) -> PathBuf {
    static BUILT: OnceLock<Mutex<Vec<PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(|| Mutex::new(Vec::new()));
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    let name = crate_dir.file_name().unwrap().to_string_lossy();
    let wasm = target_dir
        .join("wasm32-wasip2/release")
        .join(format!("{}.wasm", name.replace('-', "_")));
    if !built.iter().any(|b| b == crate_dir) {
        let manifest = crate_dir.join("Cargo.toml");
        let out = Command::new(env!("CARGO"))
            .args([
                "build",
                "--release",
                "--target",
                "wasm32-wasip2",
                "--manifest-path",
            ])
            .arg(&manifest)
            .arg("--target-dir")
            .arg(target_dir)
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_BUILD_TARGET")
            .env_remove("CARGO_MAKEFLAGS")
            .output()
            .expect("running cargo");
        assert!(
            out.status.success(),
            "building {} failed:\n{}",
            manifest.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        built.push(crate_dir.to_path_buf());
    }
    assert!(wasm.is_file(), "{} was not produced", wasm.display());
    wasm
}

/// A runtime with small limits and its own cache folder.
pub fn small_runtime(cache: &Path) -> Runtime {
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

/// The bundled `linear` merge on case A of notes/merge-cases.md: the
/// product of the returned factors is the weighted sum of deltas.
pub fn assert_good_plugin_works(rt: &Runtime) {
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
