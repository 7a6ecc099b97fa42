#!/usr/bin/env bash
# The README's main job on the built-in default: one SELMA round on ShapeWorld
# (examples/shapeworld.toml): the shipped base model (models/shapeworld-base)
# writes its own training images for four skills, the verifier filters them,
# one LoRA expert per skill + the joint adapter are trained, merged with
# `linear` and `ties`, and everything is scored by the verifier on held-out
# prompts. Prints the table and the path of report.html.
#
# Usage: scripts/demo.sh [selma run options], e.g. --run-dir runs/mine
# Re-running finds the finished stages and does no work.
# The tiny random model's round (seconds, pictures are noise):
#   target/release/selma run examples/tiny.toml
set -euo pipefail
cd "$(dirname "$0")/.."

rustup target add wasm32-wasip2 >/dev/null 2>&1 || true
echo "== building selma (first build of candle and wasmtime: 10-20 minutes on 2 cores)"
cargo build --release -q -p selma
exec target/release/selma run examples/shapeworld.toml "$@"
