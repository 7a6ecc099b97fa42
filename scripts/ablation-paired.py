#!/usr/bin/env python3
"""Paired reading of a `selma run` ablation (standard library only).

Usage: scripts/ablation-paired.py RUN_DIR [SCORER]

Every variant is compared with the base model of the same seed on the same
held-out prompts and the same noise (the eval stage draws each sample with one
seed for all variants), so a change shows as samples fixed (+) or broken (-).
Pass = the scorer's score is 1 (the shapeworld-verifier's pass). Prints, per
variant group pooled over seeds: accuracy, change vs base, +fixed/-broken and
the exact two-sided McNemar p. The report's table gives intervals over seeds;
this one is sharper for "did the expert change its skill at all".
"""
import json
import math
import os
import re
import sys



def passes(root, variant, skill, scorer):
    if variant is None:  # no base for this seed
        return None
    path = os.path.join(root, variant, skill + ".json")
    if not os.path.exists(path):
        return None
    return [x >= 1 - 1e-6 for x in json.load(open(path))[scorer]]


def mcnemar_p(fixed, broken):
    n = fixed + broken
    if n == 0:
        return 1.0
    k = min(fixed, broken)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    run = sys.argv[1]
    scorer = sys.argv[2] if len(sys.argv) > 2 else "shapeworld-verifier"
    root = os.path.join(run, "eval", "scores")
    if not os.path.isdir(root):
        sys.exit(f"{root}: no eval scores (run the eval stage first)")
    found = {f[:-6] for f in os.listdir(os.path.join(run, "eval", "prompts"))}
    # The run's skill order (pipeline.toml's [[skills]] names), else alphabetical.
    toml = open(os.path.join(run, "pipeline.toml")).read()
    named = [n for n in re.findall(r'^name\s*=\s*"([^"]+)"', toml, re.M) if n in found]
    skills = list(dict.fromkeys(named)) + sorted(found - set(named))
    variants = sorted(os.listdir(root))
    seed = lambda v: (re.search(r"seed(\d+)$", v) or [None, None])[1]
    group = lambda v: re.sub(r"-seed\d+$", "", v)
    bases = {seed(v): v for v in variants if group(v) == "base"}
    groups = sorted({group(v) for v in variants}, key=lambda g: (g != "base", g))
    print(f"{scorer}: accuracy pooled over seeds; change vs the base of the same seed, "
          "+fixed/-broken, exact McNemar p")
    width = 30
    print(f"{'variant':36s}" + "".join(f"{s:>{width}s}" for s in skills) + f"{'mean':>8s}")
    for g in groups:
        row, accs = f"{g:36s}", []
        for s in skills:
            n = hit = fixed = broken = 0
            for v in (v for v in variants if group(v) == g):
                a = passes(root, v, s, scorer)
                b = passes(root, bases.get(seed(v)), s, scorer)
                if a is None or b is None:
                    continue
                n, hit = n + len(a), hit + sum(a)
                fixed += sum(x and not y for x, y in zip(a, b))
                broken += sum(y and not x for x, y in zip(a, b))
            if n == 0:
                row += f"{'-':>{width}s}"
                continue
            accs.append(hit / n)
            cell = f"{hit / n:.3f}"
            if g != "base":
                cell += f" {(fixed - broken) / n:+.3f} +{fixed}/-{broken} p={mcnemar_p(fixed, broken):.2f}"
            row += f"{cell:>{width}s}"
        if len(accs) == len(skills):
            row += f"{sum(accs) / len(accs):>8.3f}"
        print(row)


if __name__ == "__main__":
    main()
