"""Exact single-block skip loss on a calibration token subset: ΔL_l = L(model without block l) - L(dense),
each run from the cached input state of block l (layer-major cache), so block l costs L-1-l block-forwards.

Usage: python skiploss.py SEED NSEQ  -> cache/skiploss_SEED_NSEQ.npy (+ timing)"""
import json
import sys
import time

import numpy as np
import torch

from common import CACHE, Runner, load


@torch.no_grad()
def skip_losses(r, states, ids, candidates=None):
    tot, cnt = r.nll(states[-1], ids)
    base = tot / cnt
    out = np.full(r.L, np.nan)
    for l in (range(r.L) if candidates is None else candidates):
        h = states[l]
        for j in range(l + 1, r.L):
            h = r.block(j, h)
        tot, cnt = r.nll(h, ids)
        out[l] = tot / cnt - base
    return out


if __name__ == "__main__":
    seed, nseq = int(sys.argv[1]), int(sys.argv[2])
    model, tok = load()
    r = Runner(model)
    S = torch.load(f"{CACHE}/calib_stats_{seed}.pt", weights_only=False)
    st = torch.load(f"{CACHE}/calib_states_{seed}.pt")["states"][:, :nseq].clone()
    t0 = time.perf_counter()
    d = skip_losses(r, st, S["ids"][:nseq])
    dt = time.perf_counter() - t0
    np.save(f"{CACHE}/skiploss_{seed}_{nseq}.npy", d)
    json.dump({"seconds": dt}, open(f"{CACHE}/skiploss_{seed}_{nseq}.json", "w"))
    np.set_printoptions(precision=4, suppress=True, linewidth=200)
    print(d, dt)
