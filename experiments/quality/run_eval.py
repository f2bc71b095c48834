"""Plan every method on one calibration subset and measure held-out perplexity.

Usage: python run_eval.py SEED TEXTS NSEQ_SKIP  (TEXTS: comma list of heldA,heldB)
Writes cache/results_SEED.json (appends/merges)."""
import json
import os
import sys
import time

import numpy as np
import torch

import methods as M
from common import CACHE, Evaluator, Runner, load, stream_ids, texts, windows

N_EVAL = 8
BUDGETS = (4, 6, 8)
SKIP_KINDS = os.environ.get('SKIP_KINDS', 'relmse,lin+fisher,fisher').split(',')
ONLY = [o for o in os.environ.get('ONLY', '').split(',') if o]


def plans(S, runner, states, grads, nseq_skip):
    out = []

    def add(name, fn):
        out.append((name, fn))

    add("shortgpt_bi", lambda n: M.shortgpt_bi(S, n))
    add("gromov_angular", lambda n: M.gromov_angular(S, n))
    add("last_n", lambda n: M.last_n(S, n))
    for s in range(3):
        add(f"random{s}", lambda n, s=s: M.random_blocks(n, s))
    add("sglp_paper", lambda n: M.sglp(S, n, "grad_norm"))
    S["gn_rel"] = S["grad_norm"] / S["weight_norm"]
    add("sglp_gnrel", lambda n: M.sglp(S, n, "gn_rel"))
    add("sglp_taylor", lambda n: M.sglp(S, n, "taylor"))
    add("sglp_bi", lambda n: M.sglp(S, n, "bi"))
    add("sglp_firstorder", lambda n: M.sglp(S, n, "first_order"))
    add("frame_global_bi", lambda n: M.global_in_frame(S, n, "bi"))
    add("sglp_relupd", lambda n: M.sglp(S, n, "rel_update"))
    add("frame_global_relupd", lambda n: M.global_in_frame(S, n, "rel_update"))
    GV_NSEQ = int(os.environ.get("GV_NSEQ", "4"))
    GV_SHORT = int(os.environ.get("GV_SHORT", "4"))
    sl = M.SubsetLoss(runner, states, S["ids"], nseq=GV_NSEQ)
    add("greedy_verified_relupd", lambda n: M.greedy_verified(S, n, sl, "rel_update", shortlist=GV_SHORT))
    add("greedy_verified_bi", lambda n: M.greedy_verified(S, n, sl, "bi", shortlist=GV_SHORT))
    slp = f"{CACHE}/skiploss_{S['seed']}_4.npy"
    if os.path.exists(slp):
        S["skiploss"] = np.load(slp)
        add("sglp_skiploss_prop", lambda n: M.sglp(S, n, "skiploss"))
        add("sglp_skiploss_global", lambda n: M.global_in_frame(S, n, "skiploss"))
        add("ppl_oneshot", lambda n: sorted(np.argsort(S["skiploss"], kind="stable")[:n].tolist()))
    sk = M.SegmentSkip(runner, states, grads, nseq=nseq_skip)
    for kind in SKIP_KINDS:
        add(f"skip_{kind}_prop", lambda n, kind=kind: M.sglp_skip(S, n, sk, kind=kind))
        add(f"skip_{kind}_global", lambda n, kind=kind: M.sglp_skip(S, n, sk, kind=kind, alloc="global"))
    return out


def main(seed, which, nseq_skip):
    model, tok = load()
    r = Runner(model)
    T = texts()
    evs = {name: Evaluator(r, windows(stream_ids(tok, T[name]), N_EVAL), name) for name in which}
    S = torch.load(f"{CACHE}/calib_stats_{seed}.pt", weights_only=False)
    st = torch.load(f"{CACHE}/calib_states_{seed}.pt")
    print("segments", M.segments(S), flush=True)
    P = plans(S, r, st["states"], st["grads"], nseq_skip)
    path = f"{CACHE}/results_{seed}{os.environ.get('TAG', '')}.json"
    res = json.load(open(path)) if os.path.exists(path) else {}
    res["segments"] = M.segments(S)
    res["timings"] = S["timings"]
    for name in evs:
        res.setdefault(name, {})["dense"] = evs[name].ppl([])
    print("dense", {k: res[k]["dense"] for k in evs}, flush=True)
    if ONLY:
        P = [(m, f) for o in ONLY for (m, f) in P if m == o]
    for meth, fn in P:
        for n in BUDGETS:
            t0 = time.perf_counter()
            out = fn(n)
            dt = time.perf_counter() - t0
            rem, cost = (out if isinstance(out, tuple) else (out, 0.0))
            rem = list(map(int, rem))
            row = {"removed": rem, "extra_blocks": cost, "plan_s": dt}
            for name, ev in evs.items():
                row[name] = ev.ppl(rem)
            res.setdefault("methods", {}).setdefault(meth, {})[str(n)] = row
            print(meth, n, rem, {k: round(row[k], 2) for k in evs}, f"cost={cost:.1f}", flush=True)
            json.dump(res, open(path, "w"), indent=1)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2].split(","), int(sys.argv[3]))
