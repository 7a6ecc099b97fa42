#!/usr/bin/env bash
# The test command from README.md: every unit, integration and end-to-end
# test of the workspace (the bundled wasm plugins are built on the way).
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add wasm32-wasip2 >/dev/null
cargo test --workspace "$@"
