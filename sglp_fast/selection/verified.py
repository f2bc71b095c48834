"""The default plan ("verified"): greedy removal checked against the calibration loss, inside the CKA frame.

Why not a ranking: on SmolLM2 the paper's GradNorm barely tracks the damage of removing a block (rank
correlation +0.08 with the measured skip loss), and every single-block score misses interactions between
removed neighbours (docs/quality.md). The relative update r = mean ||h_out - h_in|| / ||h_in|| tracks the skip
loss well (+0.89), so it proposes; the loss decides:

1. greedy (``greedy=True``; the API runs it only without compensation): n times, shortlist the
   ``shortlist`` lowest-r blocks that may still go (unprotected, and their Fisher segment keeps >= 1 block),
   and remove the one whose removal (with those already removed) gives the lowest calibration loss
   (``SkipVerifier``: a partial forward on a few calibration windows).
2. pick: among the greedy plan and a few whole plans proposed by other rules (r per segment with the
   proportional split, the n lowest r overall, ShortGPT's n lowest block influence, Gromov's contiguous
   angular run; with ``run_candidates`` k, the k contiguous runs of lowest angular distance over every
   token too, picked only where one has the lowest check loss), the plan with the fewest removed runs whose
   check loss is within one standard error (paired, over the check windows) of the lowest; a proposal that
   breaks the frame (empties a segment, removes a protected block) is left out. Ties go to the lower loss,
   then the earlier name in ``CANDIDATES``.
3. with ``compensate=True`` every candidate is also scored compensated: a least-squares map folded into the
   block before each removed run (``compensation.py``), each map's regularization chosen on held-out folds
   (``regularization.py``; a run whose held-out folds favour no map gets none), and the loss checked
   cross-fitted over every check window (``verifier.py``). A compensated candidate that can be picked is
   never worse than the same plan plain on the check (``never_worse``: maps that raise the loss are
   dropped); only the candidates within one standard error of the lowest option are checked plain
   (``checked_variants``). The pick is over
   plain and compensated candidates together (plain first on ties). The greedy is off then by default: its
   choices are made on plain losses, compensation reverses them (it picks the blocks right after the
   massive-activation block, which compensation cannot repair), it won 1 of 9 picks of the stop-8 benchmark
   and was over half of the search's work.

No gradient is needed, so the calibration skips the backward; the cost against the paper's pipeline is
measured in benchmarks/results/cost_smollm2.md.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..checks import check_int
from . import baselines
from .compensation import runs_of
from .protocols import Verifier
from .settings import DEFAULT_SHORTLIST
from .frame import capacity, fits_frame, lowest_in_frame, protected_blocks, segment_of, select_removed, split_budget

CANDIDATES = ("greedy", "relative_update_per_segment", "relative_update_global", "block_influence", "angular")


@dataclasses.dataclass
class VerifiedSelection:
    """The removed blocks and how they were chosen (recorded in the plan's ``selection`` entry)."""

    removed: list[int]
    picked: str
    compensated: bool
    candidates: dict[str, dict[str, Any]]
    greedy_steps: list[dict[str, Any]]
    block_forwards: float
    lowest_loss: str = ""  # the option with the lowest check loss (the pick may be a simpler one within 1 SE)
    maps: list[int] = dataclasses.field(default_factory=list)  # blocks that keep a map (compensated picks)
    plain_checks: str = ""  # with compensation: which candidates were checked plain too ("band" or "all")

    def to_dict(self) -> dict[str, Any]:
        return {"method": "verified", "picked": self.picked, "compensated": self.compensated,
                "rule": "one standard error", "lowest_loss": self.lowest_loss, "candidates": self.candidates,
                "greedy_steps": self.greedy_steps, "block_forwards": round(self.block_forwards, 3),
                **({"maps": self.maps} if self.compensated else {}),
                **({"plain_checks": self.plain_checks} if self.plain_checks else {})}


def verified_pick(*, segments: Sequence[Sequence[int]], n: int, relative_update: Sequence[float],
                  block_influence: Sequence[float], verifier: Verifier, last_token_hidden: np.ndarray | None = None,
                  protect_first: int = 0, protect_last: int = 0, allow_empty_segments: bool = False,
                  shortlist: int = DEFAULT_SHORTLIST, compensate: bool = False,
                  greedy: bool = True, run_candidates: int = 0) -> VerifiedSelection:
    """Remove ``n`` blocks by the verified rule above; ``verifier.losses(plans)`` gives calibration losses.

    ``run_candidates`` k > 0: also the k contiguous runs of lowest all-token angular distance
    (``verifier.run_distances``) that fit the frame and are not already proposed, as candidates
    ``angular_run_1``..k (docs/quality.md round 9)."""
    r = np.asarray(relative_update, dtype=np.float64)
    L = len(r)
    check_int("shortlist", shortlist, 1, expected="a positive int (candidates checked per removal)")
    check_int("run_candidates", run_candidates, 0, expected="a non-negative int (contiguous runs checked)")
    protected = protected_blocks(L, protect_first, protect_last)
    per_segment = split_budget(segments, n, protected=protected, allow_empty_segments=allow_empty_segments)
    work0 = verifier.block_forwards
    seg_of = segment_of(segments, L)
    left = capacity(segments, allow_empty_segments)

    removed: list[int] = []
    steps: list[dict[str, Any]] = []
    for _ in range(n if greedy else 0):
        allowed = [i for i in range(L) if i not in removed and i not in protected and left[seg_of[i]] > 0]
        cand = sorted(allowed, key=lambda i: (r[i], i))[:shortlist]
        losses = verifier.losses([removed + [i] for i in cand])  # they share removed's stream
        best = min(range(len(cand)), key=lambda j: (losses[j], cand[j]))
        steps.append({"shortlist": cand, "losses": [float(x) for x in losses], "removed": cand[best]})
        removed.append(cand[best])
        left[seg_of[cand[best]]] -= 1

    proposals: dict[str, list[int] | None] = {
        "greedy": sorted(removed) if greedy else None,
        "relative_update_per_segment": select_removed(segments, r, per_segment, protected),
        "relative_update_global": lowest_in_frame(r, n, segments, protected, allow_empty_segments),
        "block_influence": baselines.shortgpt(block_influence, n),
        "angular": None if last_token_hidden is None else baselines.angular_contiguous(last_token_hidden, n),
    }
    valid = {name: plan for name, plan in proposals.items()
             if plan is not None and fits_frame(plan, segments, protected, allow_empty_segments)}
    runs = lowest_runs(verifier, n, run_candidates, list(valid.values()),
                       lambda plan: fits_frame(plan, segments, protected, allow_empty_segments))
    valid.update(runs)
    order = [*CANDIDATES, *runs]
    names = [name for name in order if name in valid]
    plans = [valid[name] for name in names]
    if compensate:
        losses, found = checked_variants(verifier, plans)
    else:
        losses, found = verifier.losses(plans), []
    candidates = {name: {"removed": valid[name], "calib_loss": None if loss is None else float(loss)}
                  for name, loss in zip(names, losses)}
    for name in CANDIDATES:  # the extra runs are proposed only where they fit: never skipped
        if name not in valid:
            why = ("not run" if name == "greedy" else "not available (no last-token states)") \
                if proposals[name] is None else "breaks the frame"
            candidates[name] = {"removed": proposals[name], "calib_loss": None, "skipped": why}
    options = [(name, False) for name in names if candidates[name]["calib_loss"] is not None]
    kept_maps: dict[str, frozenset[int]] = {}
    if compensate:
        for name, (loss, maps, dropped) in zip(names, found):
            if candidates[name]["calib_loss"] is None:
                candidates[name]["plain"] = ("not checked: compensated, outside one standard error of the "
                                             "lowest")
            choices = verifier.map_choices(valid[name])
            candidates[name]["calib_loss_compensated"] = float(loss)
            candidates[name]["maps"] = {str(p): {**c.to_dict(), "kept": p in maps} for p, c in choices.items()}
            if dropped:
                candidates[name]["maps_dropped_by_check"] = sorted(dropped)
            if maps:  # a plan left with no map is the plain plan: no separate option
                kept_maps[name] = maps
                options.append((name, True))

    def loss_of(option):
        name, comp = option
        return candidates[name]["calib_loss_compensated" if comp else "calib_loss"]
    lowest = min(options, key=lambda o: (loss_of(o), options.index(o)))
    per_batch = {o: np.asarray(verifier.batch_losses([valid[o[0]]], compensated=o[1],
                                                     maps=[kept_maps.get(o[0]) if o[1] else None])[0])
                 for o in options}
    if lowest[0] in runs:  # a run candidate is picked on the lowest check only (docstring of lowest_runs)
        picked, comp = lowest
    else:
        picked, comp = one_standard_error_pick([o for o in options if o[0] not in runs], loss_of, per_batch,
                                               lowest, complexity=lambda o: len(runs_of(valid[o[0]])))
    return VerifiedSelection(removed=list(valid[picked]), picked=picked, compensated=comp, candidates=candidates,
                             greedy_steps=steps, block_forwards=verifier.block_forwards - work0,
                             lowest_loss=lowest[0] + (" + compensation" if lowest[1] else ""),
                             maps=sorted(kept_maps[picked]) if comp else [],
                             plain_checks=verifier.plain_checks if compensate else "")


def lowest_runs(verifier: Verifier, n: int, k: int, proposed: Sequence[Sequence[int]],
                fits: Callable[[list[int]], bool]) -> dict[str, list[int]]:
    """{"angular_run_i": run}: the ``k`` contiguous runs of ``n`` blocks with the lowest all-token angular
    distance that ``fits`` the frame and no other candidate proposes (ties: the shallower run).

    The pick takes one of them only where it has the lowest check loss outright, not through the 1-SE rule:
    every run candidate is a single run, the simplest kind of plan, so the rule would prefer it whenever it is
    within noise of the lowest. On subset 0 at 8 blocks the run 12-19 won that way (check 3.840 against block
    influence's 3.836) and was 14% worse on the selection domain (docs/quality.md round 10)."""
    if k == 0 or n == 0:
        return {}
    d = np.asarray(verifier.run_distances(n), dtype=np.float64)
    seen = {tuple(sorted(p)) for p in proposed}
    out: dict[str, list[int]] = {}
    for start in sorted(range(len(d)), key=lambda s: (d[s], s)):
        run = list(range(start, start + n))
        if tuple(run) in seen or not fits(run):
            continue
        out[f"angular_run_{len(out) + 1}"] = run
        if len(out) == k:
            break
    return out


def every_variant(verifier: Verifier, plans: Sequence[Sequence[int]]) -> list[frozenset[int]]:
    """Each plan's map blocks; its plain and cross-fitted compensated losses in one pass.

    Why: at 70B scale reading the blocks dominates; the statistics take one pass over the blocks before the
    runs, and both variants of every candidate then share one pass over the rest.
    """
    verifier.prepare(plans)
    maps = [verifier.map_blocks(p) for p in plans]
    k = len(plans)
    verifier.losses(list(plans) * 2, compensated=[False] * k + [True] * k, maps=[None] * k + maps)
    return maps


def checked_variants(verifier: Verifier, plans: Sequence[Sequence[int]]
                     ) -> tuple[list[float | None], list[tuple[float, frozenset[int], list[int]]]]:
    """(plain check loss or None, ``never_worse``'s (compensated loss, maps, dropped)) of each plan.

    ``verifier.plain_checks`` "all": every plan plain and compensated in one pass. "band": the compensated
    checks first (one pass), then plain only the plans whose option is within one standard error (paired, over
    the check batches) of the lowest option, as the pick measures it; the maps of those plans are then held
    to ``never_worse``, and the band is measured again until it has no plan left unchecked. Why: plain and
    compensated variants of a plan share no block call (the map sits one block before the plain plan's first
    skipped block), so the plain pass is half of the check; a plan out of the band is not picked, unless its
    maps raise the check loss so far that its plain variant would be in the band (the compensated check was
    below the plain one for every candidate of the 12 benchmark searches, docs/quality.md round 13). The
    price: the blocks after the first removed one are read once more (a second pass), which is what the
    weights' reading costs where they are streamed (lazy or copied) against half of the check's compute; the
    plan is the same whatever the memory tier. A plan the held-out folds give no map has its plain check
    from the first pass (the same loss).
    """
    k = len(plans)
    if verifier.plain_checks == "all" or k == 0:
        every_variant(verifier, plans)
        plain = verifier.losses(plans)
        return list(plain), never_worse(verifier, plans, plain)
    verifier.prepare(plans)
    maps = [verifier.map_blocks(p) for p in plans]
    comp = verifier.losses(plans, compensated=True, maps=maps)
    found: list[tuple[float, frozenset[int], list[int]]] = [(float(c), m, []) for c, m in zip(comp, maps)]
    plain: list[float | None] = [None if m else float(c) for c, m in zip(comp, maps)]
    while True:
        # every option known so far, (plan, compensated), with its per-batch losses (memoized: no pass)
        options = [(i, True) for i in range(k) if found[i][1]]
        options += [(i, False) for i in range(k) if plain[i] is not None]
        per = {(i, c): np.asarray(verifier.batch_losses([plans[i]], compensated=c,
                                                        maps=[found[i][1] if c else None])[0])
               for i, c in options}
        lowest = min(options, key=lambda o: (found[o[0]][0] if o[1] else plain[o[0]], o))
        todo = sorted({i for i, c in options if plain[i] is None and within_one_se(per[(i, c)], per[lowest])})
        if not todo:
            break
        values = verifier.losses([plans[i] for i in todo])  # one pass
        for i, value, result in zip(todo, values, never_worse(verifier, [plans[i] for i in todo], values)):
            plain[i], found[i] = float(value), result
    return plain, found


def never_worse(verifier: Verifier, plans: Sequence[Sequence[int]], plain: Sequence[float]
                ) -> list[tuple[float, frozenset[int], list[int]]]:
    """(compensated check loss, blocks keeping a map, maps dropped) of each plan, never above its plain loss.

    Why: a map chosen on held-out least-squares error can still raise the loss the model is judged by. Each
    plan starts with the maps the held-out folds favour; while its cross-fitted loss is above the plain one,
    the map whose removal lowers the loss most goes (backward elimination; all trials of a step in one pass).
    A plan left with no map has exactly its plain loss.
    """
    maps = every_variant(verifier, plans)
    loss = verifier.losses(plans, compensated=True, maps=maps)  # memoized by every_variant
    dropped: list[list[int]] = [[] for _ in plans]
    while True:
        over = [i for i in range(len(plans)) if maps[i] and loss[i] > plain[i]]
        if not over:
            break
        trials = [(i, maps[i] - {p}) for i in over for p in sorted(maps[i])]
        tried = verifier.losses([plans[i] for i, _ in trials], compensated=True, maps=[m for _, m in trials])
        for i in over:
            j = min((j for j, (k, _) in enumerate(trials) if k == i), key=lambda j: (tried[j], j))
            dropped[i] += sorted(maps[i] - trials[j][1])
            maps[i], loss[i] = trials[j][1], tried[j]
    return [(min(float(l), float(p)) if not m else float(l), m, d) for l, p, m, d in zip(loss, plain, maps, dropped)]


def one_standard_error_pick(options, loss_of, per_batch, lowest, complexity):
    """The simplest option whose loss is within one standard error of the lowest (Breiman's 1-SE rule).

    Why: on 4 check windows several compensated plans are within noise of each other, and the lowest can be
    the one that fits the calibration text best by using more fitted maps. The standard error is that of the
    paired per-window differences to the lowest option; simpler = fewer removed runs (fewer maps, fewer
    breaks in the residual stream); ties go to the lower loss, then to the earlier option.
    """
    base = per_batch[lowest]
    return min((o for o in options if within_one_se(per_batch[o], base)),
               key=lambda o: (complexity(o), loss_of(o), options.index(o)))


def within_one_se(losses: np.ndarray, lowest: np.ndarray) -> bool:
    """Whether per-batch ``losses`` are within one standard error of the ``lowest`` option's: the mean
    paired difference is at most its standard error (0 with one batch)."""
    d = np.asarray(losses, dtype=np.float64) - np.asarray(lowest, dtype=np.float64)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
    return float(d.mean()) <= se
