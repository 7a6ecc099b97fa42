#!/usr/bin/env bash
# Side-by-side: selma's train_step bench vs the PyTorch diffusers+peft
# reference (torch_train_step.py), same model config, resolution, rank,
# targets and thread count, run alternately so both see the same machine
# load. Prints every step, then the medians (wall and process CPU time),
# their ratio and each side's peak RSS. A dev tool: torch/diffusers/peft
# live in a venv outside the repository.
#
#   scripts/bench/compare_train_step.sh [ROUNDS=5] [ITERS=3] [THREADS=2]
# env: VENV (default /work/.venv-bench), MODEL (default /work/.bench-models/sd15-random,
#      written by the bench if absent), RES (128), RANK (4), PROFILE (release | dev)
set -euo pipefail
ROUNDS=${1:-5}
ITERS=${2:-3}
THREADS=${3:-2}
VENV=${VENV:-/work/.venv-bench}
MODEL=${MODEL:-/work/.bench-models/sd15-random}
RES=${RES:-128}
RANK=${RANK:-4}
PROFILE=${PROFILE:-release}
cd "$(dirname "$0")/../.."

if [ "$PROFILE" = dev ]; then prof=(--profile dev); else prof=(); fi
bench=$(cargo bench -p selma-train --bench train_step "${prof[@]}" --no-run 2>&1 |
    sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | tail -n1)
[ -x "$bench" ] || { echo "could not build the train_step bench" >&2; exit 1; }
out=$(mktemp -d)
echo "bench: $bench | torch: $VENV | model: $MODEL | ${RES}px rank $RANK | $THREADS threads | $ROUNDS rounds x $ITERS steps"
for r in $(seq 1 "$ROUNDS"); do
    echo "round $r: load $(cut -d' ' -f1-3 /proc/loadavg)"
    "$bench" --preset sd15-random --model "$MODEL" --mode fast --res "$RES" --rank "$RANK" \
        --iters "$ITERS" --threads "$THREADS" > "$out/ours.$r" 2>&1
    "$VENV/bin/python" scripts/bench/torch_train_step.py --unet-config "$MODEL/unet/config.json" \
        --res "$RES" --rank "$RANK" --iters "$ITERS" --threads "$THREADS" 2>/dev/null > "$out/torch.$r"
    grep -h '^step_s' "$out/ours.$r" | tail -n "$ITERS" | sed 's/^/  ours  /'
    grep -h '^step_s' "$out/torch.$r" | sed 's/^/  torch /'
done
python3 - "$out" "$ITERS" <<'PY'
import glob, re, statistics, sys
d, iters = sys.argv[1], int(sys.argv[2])
def collect(side):
    wall, cpu, rss = [], [], []
    for f in sorted(glob.glob(f"{d}/{side}.*")):
        lines = open(f).read().splitlines()
        steps = [l for l in lines if l.startswith("step_s")][-iters:]
        for l in steps:
            w = re.search(r"step_s ([0-9.]+)", l)
            c = re.search(r"cpu_s ([0-9.]+)", l)
            wall.append(float(w.group(1)))
            if c:
                cpu.append(float(c.group(1)))
        for l in lines:
            m = re.search(r"peak RSS ([0-9.]+) MiB", l)
            if m:
                rss.append(float(m.group(1)))
    return wall, cpu, rss
ow, oc, orss = collect("ours")
tw, tc, trss = collect("torch")
mo, mt = statistics.median(ow), statistics.median(tw)
print(f"ours : median {mo:.3f} s/step (min {min(ow):.3f}, n={len(ow)}), CPU {statistics.median(oc):.2f} s/step, peak RSS {max(orss):.0f} MiB")
print(f"torch: median {mt:.3f} s/step (min {min(tw):.3f}, n={len(tw)}), CPU {statistics.median(tc):.2f} s/step, peak RSS {max(trss):.0f} MiB")
print(f"ratio ours/torch: median {mo / mt:.2f}x, min {min(ow) / min(tw):.2f}x")
PY
