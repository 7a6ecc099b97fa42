//! Helpers for selma-runtime's integration tests: building the test-only
//! plugin crates under tests/plugins/ for wasm32-wasip2.

pub mod shared;

use std::path::{Path, PathBuf};

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../..")
        .canonicalize()
        .unwrap()
}

/// Builds the test plugin crate tests/plugins/`name` (once per test process)
/// and returns its .wasm.
pub fn test_plugin(name: &str) -> PathBuf {
    shared::build_plugin(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/plugins")
            .join(name),
        &root().join("target/wasm-test-plugins"),
    )
}
