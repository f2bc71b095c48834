"""Markdown tables from cache/results_*.json: PPL per method and budget, ratio to dense, spread over seeds."""
import glob
import json
import os
import sys

import numpy as np

from common import CACHE


def main(text):
    res = {}
    for p in sorted(glob.glob(f"{CACHE}/results_*.json")):
        seed = int(os.path.basename(p)[len("results_"):].split("-")[0].split(".")[0])
        r = json.load(open(p))
        cur = res.setdefault(seed, {"methods": {}})
        for key in ("heldA", "heldB"):
            if key in r:
                cur[key] = r[key]
        for m, v in r.get("methods", {}).items():
            for n, row in v.items():
                cur["methods"].setdefault(m, {}).setdefault(n, {}).update(row)
    dense = {s: r[text]["dense"] for s, r in res.items() if text in r}
    print(f"### {text}: dense PPL {dense}\n")
    methods = []
    for r in res.values():
        for m in r.get("methods", {}):
            if m not in methods:
                methods.append(m)
    print("| method | n=4 | n=6 | n=8 | extra block-fwds (n=4/6/8) |")
    print("|---|---|---|---|---|")
    for m in methods:
        cells, costs = [], []
        for n in ("4", "6", "8"):
            vals = [r["methods"][m][n][text] for r in res.values()
                    if m in r.get("methods", {}) and n in r["methods"][m] and text in r["methods"][m][n]]
            cs = [r["methods"][m][n]["extra_blocks"] for r in res.values()
                  if m in r.get("methods", {}) and n in r["methods"][m]]
            if not vals:
                cells.append("–")
            elif len(vals) == 1:
                cells.append(f"{vals[0]:.1f}")
            else:
                cells.append(f"{np.mean(vals):.1f} ± {np.std(vals):.1f} [{min(vals):.1f}–{max(vals):.1f}] (n={len(vals)})")
            costs.append(f"{np.mean(cs):.0f}" if cs else "–")
        print(f"| {m} | " + " | ".join(cells) + " | " + "/".join(costs) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "heldA")
