#!/usr/bin/env bash
# The README's main job on the built-in default: a small offline SELMA round
# on the tiny random model (its pictures are noise; point selma at a real
# diffusers folder for real use). Per skill: prompts from the offline
# `template` generator filtered by `rouge-l` and `length`, images rendered by
# the model itself, one LoRA expert trained on them; then the experts merged
# with the default `linear` strategy and rendered with the merged LoRA.
#
# Usage: scripts/demo.sh [OUT_DIR]   (default runs/demo; re-running reuses it)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/demo}
SKILLS=(general paragraph real-users counting counterfactual)
PER_SKILL=${PER_SKILL:-8}

rustup target add wasm32-wasip2 >/dev/null 2>&1 || true
echo "== building selma (first time: several minutes)"
cargo build -q -p selma
SELMA=target/debug/selma

mkdir -p "$OUT"
if [ ! -f "$OUT/model/model_index.json" ]; then
  echo "== selma model init --preset tiny --out $OUT/model"
  "$SELMA" model init --preset tiny --seed 0 --out "$OUT/model"
fi

experts=()
for skill in "${SKILLS[@]}"; do
  dir="$OUT/$skill"
  mkdir -p "$dir/images"
  echo "== $skill: prompts"
  "$SELMA" prompts --skill "$skill" --generator template --filter rouge-l --filter length \
    --count "$PER_SKILL" --seed 0 -q --out "$dir/prompts.jsonl"
  echo "== $skill: images from the model itself"
  : >"$dir/images/metadata.jsonl.tmp"
  i=0
  while IFS= read -r prompt; do
    file=$(printf '%03d.png' "$i")
    "$SELMA" generate --model "$OUT/model" --prompt "$prompt" --seed "$i" --steps 10 \
      --size 64x64 --out "$dir/images/$file" >/dev/null 2>&1
    python3 -c 'import json,sys; print(json.dumps({"file_name": sys.argv[1], "text": sys.argv[2]}))' \
      "$file" "$prompt" >>"$dir/images/metadata.jsonl.tmp"
    i=$((i + 1))
  done < <(python3 -c 'import json,sys; [print(json.loads(l)["text"]) for l in sys.stdin]' <"$dir/prompts.jsonl")
  mv "$dir/images/metadata.jsonl.tmp" "$dir/images/metadata.jsonl"
  echo "== $skill: LoRA expert"
  mkdir -p "$OUT/experts"
  "$SELMA" train --model "$OUT/model" --data "$dir/images" --out "$OUT/experts/$skill.safetensors" \
    --rank 4 --alpha 4 --steps 30 --batch 2 --grad-accum 1 --resolution 64 --lr 1e-3 --seed 0 \
    --save-every 1000
  experts+=("$OUT/experts/$skill.safetensors")
done

echo "== merge ${#experts[@]} experts with linear"
"$SELMA" merge "${experts[@]}" --strategy linear --out "$OUT/merged.safetensors"
echo "== render with the merged LoRA"
"$SELMA" generate --model "$OUT/model" --prompt "three red apples on a table" --seed 7 --steps 10 \
  --size 64x64 --out "$OUT/base.png"
"$SELMA" generate --model "$OUT/model" --prompt "three red apples on a table" --seed 7 --steps 10 \
  --size 64x64 --lora "$OUT/merged.safetensors" --out "$OUT/merged.png"
echo
echo "done: prompts, images and experts per skill under $OUT/<skill>/ and $OUT/experts/,"
echo "      the merged LoRA at $OUT/merged.safetensors, base vs merged samples at $OUT/base.png and $OUT/merged.png"
