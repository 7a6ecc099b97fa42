//! Builds the bundled plugins (`<root>/plugins`, a separate cargo workspace)
//! for `wasm32-wasip2` and generates `$OUT_DIR/bundled.rs`: a table of
//! (name, sha256, include_bytes!) for every plugin `.wasm` that build
//! produced. The name is the crate name without its `selma-plugin-` prefix
//! (plugins/Cargo.toml's convention), `_` turned into `-`.
//!
//! `SELMA_SKIP_BUNDLED=1` skips the plugin build and embeds nothing.

use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-wasip2";

fn main() {
    let manifest =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let root = manifest
        .join("../../..")
        .canonicalize()
        .expect("workspace root");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("bundled.rs");
    for dir in ["plugins", "plugin-sdk", "host/crates/rng", "wit"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    println!("cargo:rerun-if-env-changed=SELMA_SKIP_BUNDLED");

    let skip = std::env::var("SELMA_SKIP_BUNDLED").is_ok_and(|v| v == "1");
    let plugins_manifest = root.join("plugins/Cargo.toml");
    let wasm = if skip {
        println!("cargo:warning=SELMA_SKIP_BUNDLED=1: building selma without bundled plugins");
        Vec::new()
    } else if !plugins_manifest.is_file() {
        println!(
            "cargo:warning={} does not exist yet: building selma without bundled plugins",
            plugins_manifest.display()
        );
        Vec::new()
    } else {
        build_plugins(&root, &plugins_manifest)
    };
    write_table(&out, &wasm);
}

fn target_installed() -> bool {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let Ok(o) = Command::new(rustc).args(["--print", "sysroot"]).output() else {
        return true; // let cargo report the real problem
    };
    let sysroot = String::from_utf8_lossy(&o.stdout).trim().to_string();
    Path::new(&sysroot)
        .join("lib/rustlib")
        .join(TARGET)
        .is_dir()
}

fn build_plugins(root: &Path, manifest: &Path) -> Vec<(String, PathBuf)> {
    if !target_installed() {
        fail(&format!(
            "the {TARGET} Rust target is missing, so the bundled plugins cannot be built: run \
             `rustup target add {TARGET}` (or build with SELMA_SKIP_BUNDLED=1 to leave them out)"
        ));
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args([
            "build",
            "--release",
            "--target",
            TARGET,
            "--message-format=json-render-diagnostics",
        ])
        .arg("--manifest-path")
        .arg(manifest)
        .arg("--target-dir")
        .arg(root.join("target/wasm-plugins"));
    // Nothing of the outer build may leak into the plugin build.
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        let leak = [
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_TARGET",
            "CARGO_BUILD_RUSTFLAGS",
            "CARGO_ENCODED_RUSTFLAGS",
            "RUSTFLAGS",
            "CARGO_MAKEFLAGS",
            "MAKEFLAGS",
            "MFLAGS",
            "RUSTC_WORKSPACE_WRAPPER",
            "TARGET",
            "HOST",
            "OPT_LEVEL",
            "PROFILE",
            "DEBUG",
            "NUM_JOBS",
            "OUT_DIR",
        ]
        .contains(&k.as_ref())
            || k.starts_with("CARGO_PROFILE_")
            || k.starts_with("CARGO_CFG_")
            || k.starts_with("CARGO_FEATURE_")
            || k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_MANIFEST_")
            || k.starts_with("DEP_");
        if leak {
            cmd.env_remove(&key);
        }
    }
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("running cargo to build the bundled plugins: {e}"));
    if !output.status.success() {
        fail(&format!(
            "building the bundled plugins failed ({}):\n  cargo build --release --target {TARGET} \
             --manifest-path {} --target-dir {}\n{}\n(SELMA_SKIP_BUNDLED=1 builds selma without \
             bundled plugins)",
            output.status,
            manifest.display(),
            root.join("target/wasm-plugins").display(),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let mut wasm = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] != "compiler-artifact" {
            continue;
        }
        let crate_name = v["target"]["name"]
            .as_str()
            .unwrap_or_default()
            .replace('_', "-");
        let name = crate_name
            .strip_prefix("selma-plugin-")
            .unwrap_or(&crate_name)
            .to_string();
        for f in v["filenames"].as_array().into_iter().flatten() {
            if let Some(f) = f.as_str().filter(|f| f.ends_with(".wasm")) {
                wasm.push((name.clone(), PathBuf::from(f)));
            }
        }
    }
    wasm.sort();
    wasm.dedup_by(|a, b| a.0 == b.0);
    wasm
}

/// Stop the build with a readable message (no panic backtrace).
fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1);
}

fn write_table(out: &Path, wasm: &[(String, PathBuf)]) {
    let mut s = String::from(
        "/// Bundled plugins: (name, sha256 of the bytes, component bytes).\n\
         pub(crate) static BUNDLED: &[(&str, &str, &[u8])] = &[\n",
    );
    for (name, path) in wasm {
        let bytes =
            std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let sha = hex::encode(Sha256::digest(&bytes));
        writeln!(
            s,
            "    ({name:?}, {sha:?}, include_bytes!({:?})),",
            path.display().to_string()
        )
        .unwrap();
    }
    s.push_str("];\n");
    let tmp = out.with_extension("rs.tmp");
    std::fs::write(&tmp, s).expect("writing bundled.rs");
    std::fs::rename(&tmp, out).expect("renaming bundled.rs");
}
