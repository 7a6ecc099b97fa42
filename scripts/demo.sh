#!/usr/bin/env bash
# The README's main job on the built-in default: one complete SELMA run
# configured by examples/tiny.toml (the tiny random model, made on the fly;
# the offline `template` generator; all five bundled skills; the default
# `linear` merge; evaluation and report). The tiny model's pictures are noise:
# this shows the machinery. Real use points a pipeline.toml at a real model
# (examples/sd15.toml).
#
# Usage: scripts/demo.sh [selma run options], e.g. --run-dir runs/mine
# Re-running finds the finished stages and does no work.
set -euo pipefail
cd "$(dirname "$0")/.."

rustup target add wasm32-wasip2 >/dev/null 2>&1 || true
echo "== building selma (first build of candle and wasmtime: 10-20 minutes on 2 cores)"
cargo build -q -p selma
exec target/debug/selma run examples/tiny.toml "$@"
