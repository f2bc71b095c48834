"""Why raw GradNorm fails: rank agreement of each cheap score with the exact skip loss, per seed,
globally and within CKA segments, and GradNorm's correlation with depth."""
import glob
import sys

import numpy as np
import torch

import methods as M
from common import CACHE


def spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main():
    rows = []
    for path in sorted(glob.glob(f"{CACHE}/skiploss_*_4.npy")):
        seed = int(path.split("_")[-2])
        S = torch.load(f"{CACHE}/calib_stats_{seed}.pt", weights_only=False)
        sl = np.load(path)
        segs = M.segments(S)
        scores = {"grad_norm": S["grad_norm"], "gn/|W|": S["grad_norm"] / S["weight_norm"], "taylor": S["taylor"],
                  "bi": S["bi"], "rel_update": S["rel_update"], "first_order": S["first_order"]}
        depth = np.arange(len(sl))
        print(f"seed {seed} segments {segs}")
        print(f"  spearman(grad_norm, depth) = {spearman(S['grad_norm'], depth):+.2f}; "
              f"spearman(skip_loss, depth) = {spearman(sl, depth):+.2f}")
        for name, sc in scores.items():
            within = [spearman(sc[a:b + 1], sl[a:b + 1]) for a, b in segs if b - a >= 2]
            print(f"  {name:12s} global {spearman(sc, sl):+.2f}  within-segment mean {np.mean(within):+.2f}")
        np.set_printoptions(precision=3, suppress=True, linewidth=220)
        print("  skip_loss", sl)
    return rows


if __name__ == "__main__":
    main()
