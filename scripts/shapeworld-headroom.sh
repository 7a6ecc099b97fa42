#!/usr/bin/env bash
# Issue 12's headroom gate: before any self-training number counts, does
# supervised fine-tuning on *rendered ground truth* move the base at all?
# Per skill, render ground-truth scenes of the skill's detailed prompts (the
# grammar's captions, every object, count, colour and relation stated) as
# many as the main job draws (4 per training prompt), train one LoRA expert
# with the main job's recipe and budget (examples/shapeworld.toml: rank 16,
# lr 1e-4 cosine, 200 updates at batch 16, caption dropout 0.1, EMA 0.99,
# 30% replay of the base's pretraining scenes), and score base and expert on
# the skill's tuning prompts (another seed than the main job's evaluation,
# paired test against the base: `selma shapeworld eval`).
#
# Usage: scripts/shapeworld-headroom.sh BASE_MODEL [WORK_DIR]   (default runs/headroom)
#   WORLD=v1|v2      the world BASE was pretrained on (the replay pool's captions; default v2)
#   PROMPTS=N        tuning prompts per skill (default 200), PROMPT_SEED (default 77)
#   STEPS=N          updates per expert (default 200)
#   LR=X             learning rate (default 1e-4, the main job's)
#   SKILLS="a b"     skills to measure (default: single count binding spatial)
#   SELMA=BIN        use this selma binary instead of building one
# Prints each skill's table and writes WORK_DIR/<skill>.json; the gate holds
# when the experts' mean accuracy on their own skills beats the base's by
# at least 0.10.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${1:?usage: scripts/shapeworld-headroom.sh BASE_MODEL [WORK_DIR]}
WORK=${2:-runs/headroom}
WORLD=${WORLD:-v2}
PROMPTS=${PROMPTS:-200}
PROMPT_SEED=${PROMPT_SEED:-77}
STEPS=${STEPS:-200}
LR=${LR:-1e-4}
SKILLS=${SKILLS:-single count binding spatial}
if [ -z "${SELMA:-}" ]; then
  cargo build --release -q -p selma
  SELMA=$PWD/target/release/selma
fi
mkdir -p "$WORK"

# The main job's training prompts per skill (examples/shapeworld.toml) x 4 draws.
declare -A COUNT=([single]=20 [count]=96 [binding]=240 [spatial]=400)
if [ ! -f "$WORK/replay/metadata.jsonl" ]; then
  "$SELMA" shapeworld render --world "$WORLD" --count 3000 --seed 77 --out "$WORK/replay" --overwrite
fi
for skill in $SKILLS; do
  n=${COUNT[$skill]}
  data="$WORK/$skill.data"
  if [ ! -f "$data/metadata.jsonl" ]; then
    "$SELMA" shapeworld render --count "$n" --seed 5 --mix "$skill=1" --number-word-keep 1 \
      --out "$WORK/$skill.truth" --overwrite >/dev/null
    mkdir -p "$data"
    # Ground truth + 30% replay rows (K * 0.3 / 0.7 of them), paths relative to the listing.
    python3 - "$WORK" "$skill" "$n" > "$data/metadata.jsonl.tmp" <<'PY'
import json, random, sys
work, skill, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = [json.loads(l) for l in open(f"{work}/{skill}.truth/metadata.jsonl")]
for r in rows:
    print(json.dumps({"file_name": f"../{skill}.truth/{r['file_name']}", "text": r["text"]}))
pool = [json.loads(l) for l in open(f"{work}/replay/metadata.jsonl")]
for r in random.Random(77).sample(pool, round(n * 0.3 / 0.7)):
    print(json.dumps({"file_name": f"../replay/{r['file_name']}", "text": r["text"]}))
PY
    mv "$data/metadata.jsonl.tmp" "$data/metadata.jsonl"
  fi
  if [ ! -f "$WORK/$skill.safetensors" ]; then
    "$SELMA" train --model "$BASE" --data "$data" --out "$WORK/$skill.safetensors" \
      --rank 16 --alpha 16 --steps "$STEPS" --batch 16 --grad-accum 1 --lr "$LR" \
      --lr-schedule cosine --resolution 32 --no-flip --caption-dropout 0.1 --ema-decay 0.99 \
      --save-every 50 --seed 0 > "$WORK/$skill.train.log" 2>&1
  fi
  echo "== $skill: base vs ground-truth SFT expert ($PROMPTS tuning prompts, seed $PROMPT_SEED)"
  "$SELMA" shapeworld eval --model "$BASE" --lora "truth=$WORK/$skill.safetensors" --skills "$skill" \
    --prompts-per-skill "$PROMPTS" --prompt-seed "$PROMPT_SEED" --noise-seeds 11 --steps 15 \
    --out "$WORK/$skill.json" -q
done

# The gate's table: per skill base vs expert, then the mean over skills.
python3 - "$WORK" $SKILLS <<'PY'
import json, sys
work, skills = sys.argv[1], sys.argv[2:]
rows, base_sum, sft_sum = [], 0.0, 0.0
for s in skills:
    d = json.load(open(f"{work}/{s}.json"))
    acc = {a["variant"]: a for a in d["accuracy"] if a["skill"] == s}
    p = next(p for p in d["paired"] if p["skill"] == s)
    base_sum += acc["base"]["mean"]; sft_sum += acc["truth"]["mean"]
    rows.append(f"| {s} | {acc['base']['mean']:.3f} | {acc['truth']['mean']:.3f} | "
                f"{p['diff']:+.3f} [{p['lo']:+.3f}, {p['hi']:+.3f}], +{p['better']}/-{p['worse']}, p={p['p_mcnemar']:.2g} |")
n = len(skills)
print("| skill | base | ground-truth SFT | change |\n|---|---|---|---|")
print("\n".join(rows))
gain = (sft_sum - base_sum) / n
print(f"| mean | {base_sum / n:.3f} | {sft_sum / n:.3f} | {gain:+.3f} |")
print(f"gate (mean gain >= +0.10): {'HOLDS' if gain >= 0.10 else 'FAILS'}")
PY
