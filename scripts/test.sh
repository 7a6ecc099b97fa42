#!/usr/bin/env bash
# The test command from README.md: every unit, integration and end-to-end
# test of the workspace (the bundled wasm plugins are built on the way), then
# the bundled plugins' own unit tests, run natively. The workspace tests use
# the release profile, the same build as scripts/demo.sh: one build for both,
# and the end-to-end tests sample and train at full speed.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add wasm32-wasip2 >/dev/null 2>&1
cargo test --release --workspace "$@"
cargo test --manifest-path plugins/Cargo.toml --target-dir target/plugins-native --workspace "$@"
