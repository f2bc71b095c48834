"""Prototype: training-free linear compensation of removed runs (ReplaceMe-style, folded into down_proj).

For each maximal removed run i..j (i >= 1) fit T = I + D so that h_mid + mlp_out @ T ~= dense output of
block j, where h_mid / mlp_out are block i-1's post-attention residual and MLP output in the pruned model
(sequential: earlier fits are applied first). D by ridge least squares; fold: W_down <- T^T W_down.
usage: python compensate.py SUBSET heldB 'plan;plan' [alpha] [mode]
"""
import json
import sys

import numpy as np
import torch

from common import CACHE, Runner, load, stream_ids, texts, windows

torch.set_grad_enabled(False)


def run_block_parts(r, l, h):
    cap = {}
    hk = r.blocks[l].mlp.register_forward_hook(lambda m, i, o: cap.__setitem__("mlp", o))
    out = r.block(l, h)
    hk.remove()
    return out, cap["mlp"]


def fit(mlp, resid_target, alpha, mode):
    """D minimizing ||w*(mlp @ (I + D) - resid_target)||^2 + lam ||D||^2 (float64)."""
    X = mlp.reshape(-1, mlp.shape[-1]).double()
    Y = resid_target.reshape(-1, X.shape[1]).double() - X
    if mode == "rownorm":
        w = 1.0 / resid_target.reshape(-1, X.shape[1]).double().norm(dim=1, keepdim=True).clamp_min(1e-6)
        X, Y = X * w, Y * w
    G = X.T @ X
    lam = alpha * torch.trace(G) / G.shape[0]
    D = torch.linalg.solve(G + lam * torch.eye(G.shape[0], dtype=G.dtype), X.T @ Y)
    return D


def compensate(r, states, removed, alpha, mode):
    """Returns {block: original down_proj weight} after folding; states = calib dense states [L+1,b,s,d]."""
    removed = sorted(removed)
    runs, cur = [], [removed[0]]
    for x in removed[1:]:
        if x == cur[-1] + 1:
            cur.append(x)
        else:
            runs.append(cur); cur = [x]
    runs.append(cur)
    saved = {}
    start = max(runs[0][0] - 1, 0)
    h = states[start].clone()
    import os
    only = os.environ.get('ONLYRUN')
    run_at = {run[0] - 1: run for run in runs if run[0] >= 1 and (not only or str(run[0]) in only.split(','))}
    rem = set(removed)
    for l in range(start, r.L):
        if l in rem:
            continue
        if l in run_at:
            run = run_at[l]
            out, mlp = run_block_parts(r, l, h)
            h_mid = out - mlp
            target = states[run[-1] + 1] - h_mid
            D = fit(mlp, target, alpha, mode)
            T = torch.eye(D.shape[0], dtype=D.dtype) + D
            W = r.blocks[l].mlp.down_proj.weight
            saved[l] = W.data.clone()
            W.data = (T.T @ W.data.double()).float()
            h = h_mid + (mlp.double() @ T).float()
        else:
            h = r.block(l, h)
    return saved


def ppl_from(r, states, ids, removed, start):
    rem = set(removed)
    h = states[start].clone()
    for l in range(start, r.L):
        if l not in rem:
            h = r.block(l, h)
    tot, cnt = r.nll(h, ids)
    return float(np.exp(tot / cnt))


def main():
    subset, evname, plans = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    alpha = float(sys.argv[4]) if len(sys.argv) > 4 else 1e-3
    mode = sys.argv[5] if len(sys.argv) > 5 else "l2"
    model, tok = load()
    r = Runner(model)
    calib = torch.load(f"{CACHE}/calib_states_{subset}.pt")
    cst = calib["states"] if isinstance(calib, dict) else calib
    ev = torch.load(f"{CACHE}/dense_states_{evname}.pt")
    ids = windows(stream_ids(tok, texts()[evname]), 8)
    for plan in plans.split(";"):
        removed = [int(x) for x in plan.split(",")]
        start = max(min(removed) - 1, 0)
        base = ppl_from(r, ev, ids, removed, start)
        saved = compensate(r, cst, removed, alpha, mode)
        comp = ppl_from(r, ev, ids, removed, start)
        for l, W in saved.items():
            r.blocks[l].mlp.down_proj.weight.data = W
        print(f"{plan}: plain {base:.2f} compensated {comp:.2f} (alpha {alpha}, {mode})", flush=True)


if __name__ == "__main__":
    main()
