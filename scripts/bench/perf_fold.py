#!/usr/bin/env python3
"""Folds `perf script` output (recorded with --call-graph dwarf) of the
train_step bench into an inclusive-time table, keeping only samples taken
during training steps (the step closure on the main thread, and every
sample of the gemm/candle worker threads, which only run inside steps
once the model is loaded).

  perf record -F 200 --call-graph dwarf,32768 -o /tmp/p.data BENCH ... --iters 3
  perf script -i /tmp/p.data | python3 scripts/bench/perf_fold.py [--top 60] [--grep REGEX]
"""
import re
import sys
from collections import Counter

top = 60
pat = None
args = sys.argv[1:]
if "--top" in args:
    top = int(args[args.index("--top") + 1])
if "--grep" in args:
    pat = re.compile(args[args.index("--grep") + 1])

samples = []
cur = None
for line in sys.stdin:
    if not line.strip():
        if cur is not None:
            samples.append(cur)
        cur = None
        continue
    if cur is None:
        cur = {"comm": line.split()[0], "frames": []}
        continue
    parts = line.strip().split(None, 1)
    if len(parts) == 2:
        sym = re.sub(r"\+0x[0-9a-f]+$", "", parts[1].split(" (")[0])
        cur["frames"].append(sym)
if cur is not None:
    samples.append(cur)

kept = []
for s in samples:
    fr = s["frames"]
    in_step = any("train_step::main::{{closure}}" in f for f in fr)
    worker = not s["comm"].startswith("train_step")
    loading = any("::load" in f for f in fr)
    if (in_step or worker) and not loading:
        kept.append(s)
total = len(kept)
print(f"{len(samples)} samples, {total} in training steps")
incl = Counter()
self_c = Counter()
for s in kept:
    seen = set()
    for f in s["frames"]:
        if f not in seen:
            incl[f] += 1
            seen.add(f)
    if s["frames"]:
        self_c[s["frames"][0]] += 1
print("--- self ---")
for f, c in self_c.most_common(25):
    print(f"{100*c/total:6.2f}%  {f[:150]}")
print("--- inclusive ---")
n = 0
for f, c in incl.most_common():
    if pat and not pat.search(f):
        continue
    print(f"{100*c/total:6.2f}%  {f[:150]}")
    n += 1
    if n >= top:
        break
