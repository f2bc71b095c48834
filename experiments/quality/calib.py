"""Calibration pass for one subset: cache block states, gradients dL/dh, per-block scores, CKA.

Usage: python calib.py SEED   (subset SEED = 16 windows x 256 tokens of the built-in calibration text,
windows chosen by a seeded permutation; subsets for seeds 0,1,2 are disjoint).
"""
import sys
import time

import numpy as np
import torch

from common import CACHE, SEQ, Runner, load, stream_ids, texts, windows

N_WIN = 16


def calib_windows(tok, seed):
    ids = stream_ids(tok, texts()["calib"])
    allw = windows(ids, ids.numel() // SEQ)
    perm = torch.randperm(allw.shape[0], generator=torch.Generator().manual_seed(1234))
    return allw[perm[seed * N_WIN:(seed + 1) * N_WIN]].clone()


def unbiased_cka(states):
    """Minibatch unbiased linear CKA (Nguyen et al. 2021) of layer outputs, float64, one batch = one window."""
    L = states.shape[0]
    H = np.zeros((L, L))
    n = states.shape[2]
    for b in range(states.shape[1]):
        X = states[:, b].double()  # [L, n, d]
        K = X @ X.transpose(1, 2)
        K.diagonal(dim1=1, dim2=2).zero_()
        F = K.reshape(L, -1)
        r = K.sum(2)
        s = r.sum(1)
        Hb = (F @ F.T + torch.outer(s, s) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (r @ r.T)) / (n * (n - 3))
        H += Hb.numpy()
    d = np.sqrt(np.diag(H))
    return H / np.outer(d, d)


def main(seed):
    model, tok = load()
    r = Runner(model)
    ids = calib_windows(tok, seed)
    T = {}
    # ---- forward with cached states (paper: one calibration forward) ----
    t0 = time.perf_counter()
    with torch.no_grad():
        h = r.embed(ids)
        states = [h]
        for l in range(r.L):
            h = r.block(l, h)
            states.append(h)
        states = torch.stack(states)
    T["forward"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cka = unbiased_cka(states[1:])
    T["cka"] = time.perf_counter() - t0
    # ---- layer-wise backward from the cached states (paper: GradNorm) ----
    for p in model.parameters():
        p.requires_grad_(True)
    t0 = time.perf_counter()
    hL = states[-1].clone().requires_grad_(True)
    lg = r.logits(hL)[:, :-1]
    loss = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    grads_h = [None] * (r.L + 1)
    grads_h[r.L] = hL.grad.detach()
    g = hL.grad.detach()
    gn, wn, taylor, gn_pp, gn_rel, gn_sq_per_param = [], [], [], [], [], []
    per_param = {}
    for l in reversed(range(r.L)):
        model.zero_grad(set_to_none=True)
        x = states[l].clone().requires_grad_(True)
        y = r.block(l, x)
        y.backward(g)
        g = x.grad.detach()
        grads_h[l] = g
        sq, wsq, tay, npar = 0.0, 0.0, 0.0, 0
        rel = []
        for name, p in r.blocks[l].named_parameters():
            gg = p.grad.double()
            sq += float((gg ** 2).sum())
            wsq += float((p.double() ** 2).sum())
            tay += float((p.double() * gg).abs().sum())
            npar += p.numel()
            per_param[(l, name)] = (float(gg.norm()), float(p.double().norm()), p.numel())
        gn.append(sq ** 0.5); wn.append(wsq ** 0.5); taylor.append(tay); gn_pp.append(sq ** 0.5 / npar ** 0.5)
    T["backward"] = time.perf_counter() - t0
    for p in model.parameters():
        p.requires_grad_(False)
    gn, wn, taylor, gn_pp = (np.array(v[::-1]) for v in (gn, wn, taylor, gn_pp))
    grads_h = torch.stack(grads_h)
    # ---- free statistics from the states ----
    cos = torch.nn.functional.cosine_similarity(states[:-1], states[1:], dim=-1)  # [L, b, s]
    bi = (1 - cos).mean(dim=(1, 2)).double().numpy()
    rel_update = ((states[1:] - states[:-1]).norm(dim=-1) / states[:-1].norm(dim=-1)).mean(dim=(1, 2)).double().numpy()
    last = states[:, :, -1, :].double()  # [L+1, b, d]
    ang = np.full((r.L + 1, r.L + 1), np.nan)
    for a in range(r.L + 1):
        for c in range(a + 1, r.L + 1):
            cs = torch.nn.functional.cosine_similarity(last[a], last[c], dim=-1).clamp(-1, 1)
            ang[a, c] = float((torch.arccos(cs) / np.pi).mean())
    # first-order loss change of skipping block l: L(h_{l+1} -> h_l) ~ <g_{l+1}, h_l - h_{l+1}> (sum over tokens of mean loss)
    fo = torch.einsum("lbsd,lbsd->l", grads_h[1:].double(), (states[:-1] - states[1:]).double()).numpy()
    out = dict(seed=seed, ids=ids, loss=float(loss), timings=T, cka=cka, grad_norm=gn, weight_norm=wn,
               taylor=taylor, grad_norm_pp=gn_pp, bi=bi, rel_update=rel_update, angular=ang, first_order=fo,
               per_param=per_param)
    torch.save(out, f"{CACHE}/calib_stats_{seed}.pt")
    torch.save({"states": states, "grads": grads_h}, f"{CACHE}/calib_states_{seed}.pt")
    print("seed", seed, "loss", float(loss), T, flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
