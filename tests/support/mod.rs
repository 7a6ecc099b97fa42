//! Helpers shared by the end-to-end tests: the repository root, building
//! the test-only plugin crates under tests/plugins/ for wasm32-wasip2 (with
//! selma-runtime's test helpers) and a headless browser.
#![allow(dead_code)] // each test binary uses a different subset

pub mod browser;
/// Plugin helpers of selma-runtime's integration tests, shared.
#[path = "../../host/crates/runtime/tests/support/shared.rs"]
pub mod runtime;

use std::path::{Path, PathBuf};

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

/// Build one test plugin crate (once per test process) and return its .wasm.
pub fn test_plugin(name: &str) -> PathBuf {
    runtime::build_plugin(
        &root().join("tests/plugins").join(name),
        &root().join("target/wasm-test-plugins"),
    )
}

/// The real `selma` binary, with its component cache inside target/.
pub fn selma() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_selma"));
    c.env("SELMA_CACHE_DIR", root().join("target/selma-test-cache"));
    c
}

/// `out`, after asserting that the command succeeded (else its stdout and
/// stderr in the failure).
pub fn ok(out: std::process::Output) -> std::process::Output {
    assert!(
        out.status.success(),
        "selma failed\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
