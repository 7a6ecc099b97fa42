#!/usr/bin/env bash
# The test command from README.md: every unit, integration and end-to-end
# test of the workspace (the bundled wasm plugins are built on the way), then
# the bundled plugins' own unit tests, run natively. The workspace tests use
# the release profile, the same build as scripts/demo.sh: one build for both,
# and the end-to-end tests sample and train at full speed.
#
# What the tests need beyond Rust is installed here when missing: the
# wasm32-wasip2 target, and chromium (through apt-get, as root or with sudo)
# for the report tests, which open report.html in a real headless browser.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add wasm32-wasip2 >/dev/null 2>&1 || {
  echo "error: \`rustup target add wasm32-wasip2\` failed: the tests need Rust through rustup (see rust-toolchain.toml)" >&2
  exit 1
}

# The same binary the report tests look for (tests/support/browser.rs).
chromium="${SELMA_CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$chromium" ]; then
  missing="error: the report tests need chromium at $chromium: install Debian's chromium (apt-get install -y chromium) or set SELMA_CHROMIUM to a chromium binary, then rerun scripts/test.sh"
  if [ "$(id -u)" = 0 ]; then
    sudo=()
  elif command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
  else
    echo "$missing" >&2
    exit 1
  fi
  if [ -n "${SELMA_CHROMIUM:-}" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "$missing" >&2
    exit 1
  fi
  echo "== installing chromium (apt-get)"
  "${sudo[@]}" apt-get update -qq || true
  if ! "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
    || [ ! -x "$chromium" ]; then
    echo "$missing" >&2
    exit 1
  fi
fi

cargo test --release --workspace "$@"
cargo test --manifest-path plugins/Cargo.toml --target-dir target/plugins-native --workspace "$@"
