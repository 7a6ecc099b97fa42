//! The integration tests of the selma crate, as one test binary: every file in
//! this folder is a module of it (`autotests = false` in Cargo.toml), so the
//! heavy dependencies are linked once rather than once per file.

mod support;

mod fuzz;
mod generate;
mod merge;
mod plugins_cli;
mod prompts;
mod report;
mod run;
mod run_chaos;
mod run_compat;
mod run_disk;
mod run_dpo;
mod run_workers;
mod shapeworld;
mod shapeworld_eval;
mod shapeworld_model;
mod shapeworld_run;
mod train;

/// With `autotests = false` a test file not declared above would never run.
#[test]
fn every_test_file_is_declared() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests");
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
