#!/usr/bin/env bash
# A long fuzzing campaign over selma's input readers (tests/fuzz.rs): LoRA
# files, model safetensors, pipeline.toml, metadata.jsonl, PNG images,
# tokenizer files and .wasm components given to `plugins inspect`.
#
# Usage: scripts/fuzz.sh [CASES_PER_TARGET] [SEED]   (default 100000, seed 1;
#        CI runs 300-3000 cases per target with seed 0)
# A failing case is saved under target/fuzz-failures/<target>/; once fixed,
# copy it to tests/fixtures/fuzz/<target>/ so every run replays it.
set -euo pipefail
cd "$(dirname "$0")/.."
CASES=${1:-100000}
SEED=${2:-1}
SELMA_FUZZ_ITERS=$CASES SELMA_FUZZ_SEED=$SEED \
  cargo test --release -p selma --test integration fuzz -- --nocapture --test-threads 2 2>&1 |
  grep -E '^fuzz |test result|panicked|failing'
