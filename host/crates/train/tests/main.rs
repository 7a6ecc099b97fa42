//! The integration tests of selma-train, as one test binary: every file in
//! this folder is a module of it (`autotests = false` in Cargo.toml), so the
//! heavy dependencies are linked once rather than once per file.

mod common;

mod config;
mod dataset;
mod dpo;
mod full;
mod gradients;
mod learning;
mod optim;
mod resume;
mod roundtrip;
mod te_lora;
mod text_cache;
mod timesteps;

/// For a test that changes process-wide state (such as
/// `set_frozen_fast_path`): runs the test `name` (its path in this binary,
/// `module::test`) alone in a fresh process of this binary, as when every
/// test file was a binary of its own. Returns true in that process, where
/// the caller does its work; in the calling process it waits for the child,
/// fails with its output unless the test ran and passed, and returns false.
pub fn in_own_process(name: &str) -> bool {
    const VAR: &str = "SELMA_TEST_OWN_PROCESS";
    if std::env::var(VAR).is_ok_and(|v| v == name) {
        return true;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--test-threads=1", "--nocapture"])
        .env(VAR, name)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("test result: ok. 1 passed"),
        "{name} in its own process ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    false
}

/// With `autotests = false` a test file not declared above would never run.
#[test]
fn every_test_file_is_declared() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let main = include_str!("main.rs");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let module = if path.is_dir() {
            path.join("mod.rs").is_file()
        } else {
            path.extension().is_some_and(|e| e == "rs") && name != "main"
        };
        if module {
            assert!(
                main.contains(&format!("\nmod {name};")),
                "{} is not declared in main.rs, so its tests never run",
                path.display()
            );
        }
    }
}
