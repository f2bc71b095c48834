"""Layer-selection methods: peers (ShortGPT BI, Gromov angular, last-n, random), the paper's SGLP, variants.

Every method returns (removed block indices, extra block-forwards spent beyond the paper pipeline,
measured in block-forwards over the full calibration batch).
"""
from __future__ import annotations

import numpy as np
import torch

from sglp_fast.segmentation.fisher import fisher_segment

L = 30


# ----------------------------------------------------------------------------------------------- peers
def shortgpt_bi(S, n):
    return sorted(np.argsort(S["bi"], kind="stable")[:n].tolist())


def gromov_angular(S, n):
    ang = S["angular"]
    best = min(range(0, L - n + 1), key=lambda l: ang[l, l + n])
    return list(range(best, best + n))


def last_n(S, n):
    return list(range(L - n, L))


def random_blocks(n, seed):
    return sorted(np.random.default_rng(seed).choice(L, n, replace=False).tolist())


# ----------------------------------------------------------------------------------------------- SGLP frame
def segments(S, k="auto"):
    return fisher_segment(S["cka"], k=k).segments


def proportional_split(segs, n, cap_keep=1):
    """Largest-remainder split of n over segments proportional to size (ties -> lower index); each segment
    keeps >= cap_keep blocks (excess goes to the next largest remainder)."""
    sizes = np.array([b - a + 1 for a, b in segs], dtype=float)
    quota = n * sizes / sizes.sum()
    alloc = np.floor(quota).astype(int)
    caps = np.maximum(sizes.astype(int) - cap_keep, 0)
    alloc = np.minimum(alloc, caps)
    rema = quota - np.floor(quota)
    order = sorted(range(len(segs)), key=lambda i: (-rema[i], i))
    while alloc.sum() < n:
        for i in order:
            if alloc.sum() >= n:
                break
            if alloc[i] < caps[i]:
                alloc[i] += 1
        if alloc.sum() < n and all(alloc[i] >= caps[i] for i in order):
            raise ValueError("budget exceeds removable blocks")
    return alloc.tolist()


def within_segments(segs, alloc, score):
    """Remove the alloc[i] lowest-score blocks of segment i (ties -> lower index)."""
    removed = []
    for (a, b), m in zip(segs, alloc):
        idx = list(range(a, b + 1))
        idx.sort(key=lambda l: (score[l], l))
        removed += idx[:m]
    return sorted(removed)


def sglp(S, n, score="grad_norm", k="auto"):
    segs = segments(S, k)
    sc = S[score] if isinstance(score, str) else score
    return within_segments(segs, proportional_split(segs, n), sc)


def global_in_frame(S, n, score, k="auto", keep=1):
    """n lowest scores overall, but each segment keeps >= keep blocks (segments as the constraint)."""
    segs = segments(S, k)
    sc = S[score] if isinstance(score, str) else score
    left = {i: (b - a + 1) for i, (a, b) in enumerate(segs)}
    seg_of = {l: i for i, (a, b) in enumerate(segs) for l in range(a, b + 1)}
    removed = []
    for l in sorted(range(L), key=lambda l: (sc[l], l)):
        if len(removed) == n:
            break
        if left[seg_of[l]] > keep:
            removed.append(l)
            left[seg_of[l]] -= 1
    return sorted(removed)


# ----------------------------------------------------------------------------------------------- segment-local skip
class SegmentSkip:
    """Skip candidates inside a segment and measure the change at the segment output from cached inputs.

    states[l] = input of block l ([L+1, b, s, d]); grads[l] = dL/d states[l] (from the backward)."""

    def __init__(self, runner, states, grads, nseq=16):
        self.r = runner
        self.st = states[:, :nseq]
        self.gr = grads[:, :nseq] * (grads.shape[1] / nseq)
        self.frac = nseq / states.shape[1]
        self.cost = 0.0  # block-forwards in units of the full calibration batch
        self.memo = {}

    @torch.no_grad()
    def run(self, a, b, keep):
        """Output of segment [a, b] keeping only `keep`, from cached inputs: the state entering the first
        skipped block is memoized by the kept prefix, so a candidate costs only the kept blocks after it."""
        skipped = [l for l in range(a, b + 1) if l not in keep]
        start = skipped[-1] + 1 if skipped else a
        h = self._prefix(a, start, tuple(l for l in range(a, start) if l in keep))
        for l in range(start, b + 1):
            if l in keep:
                h = self.r.block(l, h)
                self.cost += self.frac
        return h

    @torch.no_grad()
    def _prefix(self, a, l, kept):
        """State entering block l after running the kept blocks of [a, l) from states[a] (memoized)."""
        if len(kept) == l - a:
            return self.st[l]
        key = (a, l, kept)
        if key not in self.memo:
            prev = l - 1
            h = self._prefix(a, prev, tuple(x for x in kept if x < prev))
            if prev in kept:
                h = self.r.block(prev, h)
                self.cost += self.frac
            self.memo[key] = h
        return self.memo[key]

    def distortion(self, a, b, keep, kind):
        ref = self.st[b + 1]
        out = self.run(a, b, keep)
        d = (out - ref).double()
        if kind == "relmse":
            return float((d.pow(2).sum(-1) / ref.double().pow(2).sum(-1)).mean())
        if kind == "cos":
            return float((1 - torch.nn.functional.cosine_similarity(out.double(), ref.double(), dim=-1)).mean())
        g = self.gr[b + 1].double()
        if kind == "lin":  # first-order loss change at the segment output
            return float((g * d).sum())
        if kind == "fisher":  # empirical-Fisher (Gauss-Newton) quadratic: sum_t (g_t . d_t)^2 * N
            per_tok = (g * d).sum(-1)
            return float(per_tok.pow(2).sum() * per_tok.numel())
        if kind == "lin+fisher":
            per_tok = (g * d).sum(-1)
            return float(per_tok.sum() + 0.5 * per_tok.pow(2).sum() * per_tok.numel())
        raise ValueError(kind)


def sglp_skip(S, n, sk: SegmentSkip, kind="relmse", k="auto", greedy=True, alloc="proportional"):
    """Within CKA segments, remove the block(s) whose skip distorts the segment output least.

    alloc="proportional": paper's largest-remainder split, then per segment greedy (re-score after each removal).
    alloc="global": global greedy over all segments on a loss-comparable distortion (kind lin/fisher/...),
    each step removing the cheapest candidate anywhere (re-scoring only the segment that changed)."""
    segs = segments(S, k)
    keep = [set(range(a, b + 1)) for a, b in segs]
    removed = []
    sk.cost = 0.0
    sk.memo = {}
    if alloc == "proportional":
        for si, ((a, b), m) in enumerate(zip(segs, proportional_split(segs, n))):
            if not greedy:
                sc = {l: sk.distortion(a, b, keep[si] - {l}, kind) for l in keep[si]}
                drop = sorted(sc, key=lambda l: (sc[l], l))[:m]
                removed += drop
                continue
            for _ in range(m):
                sc = {l: sk.distortion(a, b, keep[si] - {l}, kind) for l in keep[si]}
                l = min(sc, key=lambda l: (sc[l], l))
                keep[si].discard(l)
                removed.append(l)
        return sorted(removed), sk.cost
    # global greedy: candidate table per segment, re-scored only where something changed
    table = {}
    for si, (a, b) in enumerate(segs):
        for l in keep[si]:
            table[(si, l)] = sk.distortion(a, b, keep[si] - {l}, kind)
    base = {si: 0.0 for si in range(len(segs))}  # current distortion of each segment
    for _ in range(n):
        cands = [(v - base[si], l, si) for (si, l), v in table.items() if len(keep[si]) > 1]
        dv, l, si = min(cands)
        keep[si].discard(l)
        removed.append(l)
        a, b = segs[si]
        base[si] = table[(si, l)]
        for key in [key for key in table if key[0] == si]:
            del table[key]
        for l2 in keep[si]:
            table[(si, l2)] = sk.distortion(a, b, keep[si] - {l2}, kind)
    return sorted(removed), sk.cost


# ----------------------------------------------------------------------------------------------- verified greedy
class SubsetLoss:
    """Calibration loss of a removal set on a token subset, run from the cached dense state at the first
    removed block (layer-major cache), memoized; cost counted in full-batch block-forwards."""

    def __init__(self, runner, states, ids, nseq=4):
        self.r = runner
        self.st = states[:, :nseq]
        self.ids = ids[:nseq]
        self.frac = nseq / states.shape[1]
        self.memo = {}
        self.cost = 0.0

    @torch.no_grad()
    def __call__(self, removed):
        key = tuple(sorted(removed))
        if key not in self.memo:
            first = key[0] if key else self.r.L
            h = self.st[first]
            for l in range(first, self.r.L):
                if l not in key:
                    h = self.r.block(l, h)
                    self.cost += self.frac
            tot, cnt = self.r.nll(h, self.ids)
            self.memo[key] = tot / cnt
        return self.memo[key]


def greedy_verified(S, n, loss: SubsetLoss, score="rel_update", shortlist=4, k="auto", keep=1):
    """Inside the CKA frame (each segment keeps >= keep blocks), remove blocks one at a time: shortlist the
    `shortlist` removable blocks with the lowest cheap score, measure the calibration loss of removing each
    (together with the blocks already removed) and drop the best. Re-scoring after every removal captures
    the interactions (e.g. neighbouring removals) that single-block scores miss."""
    segs = segments(S, k)
    sc = S[score] if isinstance(score, str) else score
    seg_of = {l: i for i, (a, b) in enumerate(segs) for l in range(a, b + 1)}
    left = {i: (b - a + 1) for i, (a, b) in enumerate(segs)}
    removed = []
    loss.cost = 0.0
    loss.memo = {}
    for _ in range(n):
        cands = [l for l in sorted(range(L), key=lambda l: (sc[l], l)) if l not in removed and left[seg_of[l]] > keep]
        cands = cands[:shortlist]
        best = min(cands, key=lambda l: (loss(removed + [l]), l))
        removed.append(best)
        left[seg_of[best]] -= 1
    return sorted(removed), loss.cost
