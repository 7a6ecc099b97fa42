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
