"""Calibration loss of the model with some blocks skipped, run from the cached dense block inputs.

Why: single-block scores miss interactions (removing neighbours costs more than the sum of their single
costs; docs/quality.md), so the default plan checks its choices against the real loss. The check is cheap:
the calibration forward already produced every block's dense input, so a plan that removes blocks R starts
at block min(R) from its cached input, runs the kept blocks after it and the head. Every plan of a call
shares one layer-major pass: each block is brought to the device once per pass (a search round), whatever
the number of plans and maps, and results are memoized per removed set.

Compensated plans are checked cross-fitted: the check windows are split into ``folds`` contiguous folds,
and a window of fold f runs with maps fitted on every kept window but fold f's (``run_statistics.py``,
``regularization.py``), so every check window is held out from the maps it is judged with. For an encoder
without a head the "loss" is the embedding distortion against the dense model (mean 1 - cos of the pooled
embeddings), not the pooled-energy proxy GradNorm backpropagates: a plan is judged by how far it moves what
the model outputs.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from torch import nn

from .. import distributed as dist
from ..calibration import losses as G
from ..calibration.kept_inputs import KeptInputs
from ..checks import check_int
from ..sizes import fmt_bytes
from . import regularization as R
from .compensation import mlp_output_module, patched, runs_of
from .matrix_store import MatrixStore
from .run_statistics import RunStatistics, accumulate
from .settings import DEFAULT_FOLDS

log = logging.getLogger(__name__)

PLAIN_CHECKS = ("band", "all")  # the compensated search's plain checks (``SkipVerifier.plain_checks``)


class SkipVerifier:
    """``loss(removed)``: mean calibration loss on the check windows with blocks ``removed`` skipped.

    Built by the selection stage from the handle calibration returns (``calibrate(..., keep_inputs=m)
    .kept_inputs``): the leading kept batches holding >= ``verify_windows`` windows are the loss check, split
    into ``folds`` folds for the cross-fitted compensated check; the trailing ``fit_only_windows`` windows
    (over every rank) only feed the compensation statistics. ``matrices``: where the d x d statistics and
    maps live (``matrix_store.MatrixStore``; default: memory, no limit). ``plain_checks``: "band" (default)
    or "all", which candidates the compensated search also checks plain (``verified.checked_variants``). It
    owns the handle and the store: close it (``close()`` or ``with``). It implements ``protocols.Verifier``
    (the search) and ``protocols.BlockRunner`` (the statistics).
    """

    def __init__(self, kept: KeptInputs, verify_windows: int, window_offset: int = 0, folds: int = DEFAULT_FOLDS,
                 policy: str | R.MapPolicy = R.CV, extra_statistics: Callable | None = None,
                 matrices: MatrixStore | None = None, plans_per_pass: int | None = None,
                 plain_checks: str = "band") -> None:
        check_int("verify_windows", verify_windows, 1)
        check_int("window_offset", window_offset, 0)
        check_int("folds", folds, 1, expected="a positive int (cross-fitting folds of the check windows)")
        check_int("plans_per_pass", plans_per_pass, 1, expected="a positive int or None", optional=True)
        self._kept = kept
        self._window_offset = window_offset
        self.adapter = kept.adapter
        self.num_blocks = kept.num_blocks
        self._kind = kept.loss_kind
        self._windows = kept.windows
        self.policy = R.get_policy(policy)
        # extra_statistics(runs, weighted) -> {run: RunStatistics}: the fit-only windows' statistics (a
        # forward-only pass over them, built by the API); they land in the never-held-out slot
        self._extra_statistics = extra_statistics
        # the d x d float64 statistics, decompositions and maps: in memory up to the plan's room, then on disk
        self.matrices = matrices if matrices is not None else MatrixStore()
        # plans one pass over the blocks checks together (None: every plan of a call): each holds its hidden
        # state of every check window, so the memory plan caps them (``memory._search_states``); more plans
        # than that take more passes, each reading the blocks again (same losses)
        # data-parallel: every rank makes the same passes (each gathers the losses): the smallest rank's cap
        caps = [c for c in dist.gather_lists([plans_per_pass or 0], tag="check_losses") if c > 0]
        self.plans_per_pass = int(min(caps)) if caps else None
        self.plain_checks = plain_checks  # which candidates the compensated search checks plain too
        # the maps' solves run on the compute device (float64: a GPU's eigendecomposition at d = 8192 takes
        # seconds where two CPU cores take minutes); the memory plan counts them there (``_Phase.solve``)
        self._solve_device = getattr(kept, "device", None)
        # data-parallel (sglp_fast.distributed): this rank's kept batches start at global window
        # ``window_offset``; the check batches are the leading ones globally (on one rank or several), and
        # their losses are gathered in the global window order. Without a process group: offset 0, all local.
        self._nv = _leading_batches(kept.windows, verify_windows, window_offset)
        self._check_windows, self._all_windows = (int(x) for x in dist.all_reduce_sum(
            np.array([sum(self._windows[:self._nv]), kept.total_windows], dtype=np.float64), tag="check_losses"))
        starts = window_offset + np.concatenate([[0], np.cumsum(self._windows)])[:-1]
        # the fold of each kept batch: contiguous folds of the check windows (a batch is never split), then
        # renumbered over the folds some batch (on any rank) falls in: an empty fold would fit and judge
        # nothing but hold d x d statistics and maps; ``self.folds`` = never held out
        raw = [min(folds - 1, int(starts[b]) * folds // max(self._check_windows, 1)) for b in range(self._nv)]
        used = np.zeros(folds, dtype=np.float64)
        used[raw] = 1.0
        used = dist.all_reduce_sum(used, tag="check_losses")
        renumber = {f: i for i, f in enumerate(f for f in range(folds) if used[f] > 0)}
        self.folds = max(1, len(renumber))
        self.fold_of_batch = [renumber[raw[b]] if b < self._nv else self.folds for b in range(kept.num_batches)]
        self._stats: dict[tuple[tuple[int, int], bool], RunStatistics] = {}
        self._choices: dict[tuple[tuple[int, int], str], R.MapChoice] = {}
        self._fitted: dict[tuple[tuple[int, int], str, int | None], torch.Tensor] = {}
        self._memo: dict[tuple, tuple[float, list[float]]] = {}  # loss, per batch
        self._dense_pooled: dict[int, torch.Tensor] = {}  # headless encoders: the dense sentence embeddings
        self.window_block_forwards = 0  # block calls x windows, the work spent so far
        # wall seconds by part (the plan stage's split, Analysis.timings["plan_<part>_s"]): the statistics pass
        # over the kept windows, the fit-only windows' pass, the maps' solves, the check passes
        self.seconds = dict.fromkeys(("statistics", "fit_only", "solve", "check"), 0.0)
        self.closed = False

    @classmethod
    def without_inputs(cls, adapter, loss_kind: str, total_windows: int, verify_windows: int,
                       window_offset: int, folds: int = DEFAULT_FOLDS) -> SkipVerifier:
        """Data-parallel: a rank that keeps none of the check or fit windows still joins every sum and gather."""
        return cls(_NoKeptInputs(adapter, loss_kind, total_windows), verify_windows, window_offset, folds)

    @property
    def plain_checks(self) -> str:
        """Which candidates the compensated search also checks plain (``verified.checked_variants``)."""
        return self._plain_checks

    @plain_checks.setter
    def plain_checks(self, value: str) -> None:
        if value not in PLAIN_CHECKS:
            raise ValueError(f"plain_checks: expected one of {list(PLAIN_CHECKS)}, got {value!r}")
        self._plain_checks = value

    @property
    def num_windows(self) -> int:
        """Windows the loss is checked on (over every rank)."""
        return self._check_windows

    # -- the pieces run_statistics.accumulate streams with --------------------------------------------
    def cached_input(self, layer: int, batch: int) -> torch.Tensor:
        """The dense model's input of block ``layer`` (``num_blocks``: the last block's output)."""
        return self._kept.block_input(layer, batch)

    def token_mask(self, batch: int) -> torch.Tensor:
        return self._kept.token_mask(batch)

    @contextlib.contextmanager
    def block(self, layer: int, transform: torch.Tensor | None = None,
              next_layer: int | None = None) -> Iterator[nn.Module]:
        """Block ``layer`` on the device (with ``transform`` folded into its MLP output), released after;
        ``next_layer`` (the block read next) arrives meanwhile when the weights prefetch."""
        with self._kept.block(layer, next_layer) as block:
            if transform is None:
                yield block
            else:
                with patched(mlp_output_module(self.adapter, block), transform):
                    yield block

    def call(self, block: nn.Module, layer: int, hidden: torch.Tensor, batch: int) -> torch.Tensor:
        self.window_block_forwards += self._windows[batch]
        return self._kept.call(block, layer, hidden, batch)

    @contextlib.contextmanager
    def _timed(self, part: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] += time.perf_counter() - t0

    # -- compensation maps ------------------------------------------------------------------------------
    def map_choices(self, removed: Iterable[int], policy: str | R.MapPolicy | None = None) -> dict[int, R.MapChoice]:
        """{block before a run: its regularization} for every run of the plan that can have a map (a >= 1).

        A choice without a map (``has_map`` False: the held-out folds say no map is better) is included, so
        the caller sees why. The statistics of every run not seen before come from one pass over the blocks.
        """
        policy = R.get_policy(policy or self.policy)
        runs = [run for run in runs_of(self._check(removed)) if run[0] >= 1]
        self._ensure_statistics(runs, policy.weighted)
        out = {}
        for run in runs:
            key = (run, policy.name)
            if key not in self._choices:
                with self._timed("solve"):
                    self._choices[key] = self._choose(run, policy)
            out[run[0] - 1] = self._choices[key]
        return out

    def _choose(self, run: tuple[int, int], policy: R.MapPolicy) -> R.MapChoice:
        """The run's regularization; with a map, its held-out maps too, from the decompositions the
        cross-validation made (each fold's map is needed by the cross-fitted check; no second eigh)."""
        stats = self._stats[run, policy.weighted]
        choice, solutions = R.choose_with_solutions(stats, policy, range(self.folds), keep=self.matrices.keep,
                                                    device=self._solve_device)
        try:
            if choice.has_map:
                for f, solution in solutions.items():
                    self._fitted[run, policy.name, f] = self.matrices.keep(
                        R.fit(stats, choice, f, solution, device=self._solve_device))
        finally:
            for solution in solutions.values():
                self.matrices.release(solution.V, solution.Ap)
        return choice

    def statistics(self, removed: Iterable[int], policy: str | R.MapPolicy | None = None) -> dict[int, RunStatistics]:
        """{block before a run: the statistics its map is fitted from} for every run of the plan that can have
        a map (a >= 1), under ``policy``'s row weighting: for studies of other fits (docs/quality.md, round 6)
        and callers that fit maps of their own. Shared with the verifier: read them, do not change them."""
        policy = R.get_policy(policy or self.policy)
        runs = [run for run in runs_of(self._check(removed)) if run[0] >= 1]
        self._ensure_statistics(runs, policy.weighted)
        return {run[0] - 1: self._stats[run, policy.weighted] for run in runs}

    def map_blocks(self, removed: Iterable[int], policy: str | R.MapPolicy | None = None) -> frozenset[int]:
        """The blocks that get a map under ``policy`` (the runs where the held-out folds favour one)."""
        return frozenset(p for p, c in self.map_choices(removed, policy).items() if c.has_map)

    def transforms(self, removed: Iterable[int], fold: int | None = None, maps: Iterable[int] | None = None,
                   policy: str | R.MapPolicy | None = None) -> dict[int, torch.Tensor]:
        """{block p: T} for the plan's maps (``maps``: the blocks to keep one at; None = ``map_blocks``).

        ``fold`` None: fitted on every kept window (the final model); f: on every window but fold f's.
        """
        policy = R.get_policy(policy or self.policy)
        choices = self.map_choices(removed, policy)
        keep = self.map_blocks(removed, policy) if maps is None else frozenset(int(p) for p in maps)
        if not keep <= set(choices):
            raise ValueError(f"maps: blocks {sorted(keep - set(choices))} are not right before a removed run of "
                             f"{sorted(self._check(removed))}")
        out = {}
        for p in sorted(keep):
            choice = choices[p]
            if not choice.has_map:
                continue
            run = next(r for r in runs_of(self._check(removed)) if r[0] - 1 == p)
            key = (run, policy.name, fold)
            if key not in self._fitted:
                with self._timed("solve"):
                    self._fitted[key] = self.matrices.keep(R.fit(self._stats[run, policy.weighted], choice,
                                                                 without_fold=fold, device=self._solve_device))
            out[p] = self._fitted[key]
        return out

    @torch.no_grad()
    def run_distances(self, n: int) -> np.ndarray:
        """[num_blocks - n + 1] float64: for each run s..s+n-1, the mean over every real token of the check
        windows of arccos(cos(h_s, h_s+n)) / pi between the dense states entering and leaving it.

        Why: Gromov's rule measures this on the last token only and proposes one run; over every token it
        ranks the runs as the compensated check does (docs/quality.md round 9), from states the check already
        holds: no forward, two reads of each kept input. Data-parallel: summed over the ranks."""
        check_int("n", n, 1, expected=f"a run length in [1, {self.num_blocks}]")
        if n > self.num_blocks:
            raise ValueError(f"n: a run of {n} blocks does not fit in {self.num_blocks} blocks")
        starts = self.num_blocks - n + 1
        sums = np.zeros(starts + 1, dtype=np.float64)  # per run, then the token count
        for b in range(self._nv):
            mask = self.token_mask(b).reshape(-1)
            sums[-1] += float(mask.sum())

            def tokens(layer: int) -> torch.Tensor:  # the real tokens' states, float64 [tokens, d]
                h = self.cached_input(layer, b)
                return h.reshape(-1, h.shape[-1])[mask.to(h.device)].double()

            for s in range(starts):
                cos = torch.nn.functional.cosine_similarity(tokens(s), tokens(s + n), dim=-1).clamp(-1.0, 1.0)
                sums[s] += float(torch.arccos(cos).sum()) / np.pi
        sums = dist.all_reduce_sum(sums, tag="run_distances")
        return sums[:-1] / max(sums[-1], 1.0)

    def prepare(self, plans: Iterable[Iterable[int]], policy: str | R.MapPolicy | None = None) -> None:
        """The statistics of every run of ``plans`` in one pass (each needed block read once)."""
        policy = R.get_policy(policy or self.policy)
        runs = {run for p in plans for run in runs_of(self._check(p)) if run[0] >= 1}
        self._ensure_statistics(sorted(runs), policy.weighted)

    def _ensure_statistics(self, runs: list[tuple[int, int]], weighted: bool) -> None:
        todo = [run for run in runs if (run, weighted) not in self._stats]
        if not todo:
            return
        # what the memory plan could only bound before calibration (the candidates were not known): per run,
        # XᵀX and XᵀY per slot and a map per fold and the final one, d x d float64 each, on the host (in
        # memory up to the store's room, then on disk)
        width = int(self.adapter.config.hidden_size)
        per_run = 3 * (self.folds + 1) * width * width * 8
        before = len({run for run, _ in self._stats})
        log.info("compensation: %d new run(s) %s, up to %s of d x d float64 statistics and maps (%s with the "
                 "%d run(s) before; now %s in memory, %s on disk)", len(todo), todo,
                 fmt_bytes(len(todo) * per_run), fmt_bytes((len(todo) + before) * per_run), before,
                 fmt_bytes(self.matrices.resident_bytes), fmt_bytes(self.matrices.spilled_bytes))
        with self._eval_mode(), torch.no_grad():
            with self._timed("statistics"):
                stats = accumulate(self, todo, self.fold_of_batch, self.folds, weighted=weighted,
                                   check=self._window_offset == 0,  # one rank checks (as one process would)
                                   store=self.matrices)
            if self._extra_statistics is not None:
                with self._timed("fit_only"):
                    for run, extra in self._extra_statistics(todo, weighted).items():
                        stats[run].add_statistics(self.folds, extra)
        trained = [float(s.tokens.sum()) - float(s.tokens[:self.folds].max()) for s in stats.values()]
        if any(t <= 0 for t in trained):
            raise ValueError("compensate: no calibration windows left to fit on once a fold is held out; use "
                             "more calibration windows, folds >= 2, or compensate=False")
        self._stats.update({(run, weighted): st for run, st in stats.items()})

    @property
    def block_forwards(self) -> float:
        """Work spent, in block-forwards over the whole calibration set (one model forward = num_blocks).

        Data-parallel: summed over the ranks (a collective: every rank reads it at the same point)."""
        work = dist.all_reduce_sum(float(self.window_block_forwards), tag="check_losses")
        return work / max(self._all_windows, 1)

    def _check(self, removed: Iterable[int]) -> frozenset[int]:
        if self.closed:
            raise ValueError("verifier: closed (the cached block inputs are gone); run analyze() again to "
                             "plan with scorer 'verified'")
        key = frozenset(int(i) for i in removed)
        bad = [i for i in key if not 0 <= i < self.num_blocks]
        if bad or len(key) >= self.num_blocks:
            raise ValueError(f"removed: expected distinct block indices in [0, {self.num_blocks - 1}] leaving at "
                             f"least one block, got {sorted(key)}")
        return key

    def loss(self, removed: Iterable[int], compensated: bool = False) -> float:
        return self.losses([removed], compensated)[0]

    @torch.no_grad()
    def losses(self, plans: Sequence[Iterable[int]], compensated: bool = False, all_windows: bool = False,
               maps: Sequence[Iterable[int] | None] | None = None,
               policy: str | R.MapPolicy | None = None) -> list[float]:
        """The loss of each plan (a set of removed blocks); new plans share one pass over the blocks.

        ``compensated``: with the plan's maps, cross-fitted (``maps[i]``: the blocks plan i keeps a map at;
        None = every map the held-out folds favour). ``all_windows``: with the maps fitted on every window
        (the final model; not held out). ``compensated`` and ``all_windows`` may also be one flag per plan,
        so that plain, cross-fitted and final variants share one pass. Plans of one call that share a prefix
        (the same blocks skipped and the same maps up to some block) compute it once (same values).
        """
        return [value for value, _ in self._evaluated(plans, compensated, all_windows, maps, policy)]

    @torch.no_grad()
    def batch_losses(self, plans: Sequence[Iterable[int]], compensated: bool = False,
                     all_windows: bool = False, maps: Sequence[Iterable[int] | None] | None = None,
                     policy: str | R.MapPolicy | None = None) -> list[list[float]]:
        """Each plan's mean loss per check batch (the spread the pick's one-standard-error rule needs)."""
        return [list(b) for _, b in self._evaluated(plans, compensated, all_windows, maps, policy)]

    def _evaluated(self, plans, compensated, all_windows, maps, policy) -> list[tuple[float, list[float]]]:
        """(loss, loss per check batch) of each plan, run once per plan and memoized."""
        policy = R.get_policy(policy or self.policy)
        n = len(plans)
        maps = [None] * n if maps is None else list(maps)
        comps = [compensated] * n if isinstance(compensated, bool) else [bool(c) for c in compensated]
        finals = [all_windows] * n if isinstance(all_windows, bool) else [bool(f) for f in all_windows]
        if not len(maps) == len(comps) == len(finals) == n:
            raise ValueError(f"maps/compensated/all_windows: expected one entry per plan ({n})")
        keys = []
        for p, m, comp, final in zip(plans, maps, comps, finals):
            removed = self._check(p)
            kept = (self.map_blocks(removed, policy) if m is None else frozenset(int(x) for x in m)) \
                if comp else frozenset()
            keys.append((removed, kept, bool(kept) and final, policy.name if kept else ""))
        todo = list(dict.fromkeys(k for k in keys if k not in self._memo))
        step = self.plans_per_pass or max(len(todo), 1)
        for i in range(0, len(todo), step):
            part = todo[i:i + step]
            fixes = [self._fixes(removed, kept, final, policy) for removed, kept, final, _ in part]
            with self._eval_mode(), self._timed("check"):
                for key, result in zip(part, self._run([k[0] for k in part], fixes)):
                    self._memo[key] = result
        return [self._memo[k] for k in keys]

    def _fixes(self, removed, kept, final: bool, policy) -> dict[int, list[torch.Tensor]]:
        """{block p: the map each check batch runs with}: its fold's held-out map, or the final map."""
        if not kept:
            return {}
        if final:
            return {p: [T] * self._nv for p, T in self.transforms(removed, None, kept, policy).items()}
        per_fold = {f: self.transforms(removed, f, kept, policy) for f in sorted(set(self.fold_of_batch[:self._nv]))}
        blocks = set().union(*(set(m) for m in per_fold.values())) if per_fold else set()
        return {p: [per_fold[self.fold_of_batch[b]][p] for b in range(self._nv)] for p in blocks}

    def _run(self, plans: list[frozenset[int]], fixes: list[dict[int, list[torch.Tensor]]]
             ) -> list[tuple[float, list[float]]]:
        """Each plan's (loss, loss per check batch), every block read once and every distinct stream run once.

        Why streams: candidate plans share prefixes (several remove block 3 and keep 4..11; the compensated
        variants of two plans removing the same run fold the same map). A stream is one check batch's hidden
        state named by its history: the dense input it started from, then per block run (block, map). Plans
        whose histories agree share the tensor, so a prefix is computed once, whatever the number of plans
        (the greedy's candidates, base + one block each, share base's stream up to the block they add).
        """
        L, nb = self.num_blocks, self._nv
        start = [min(list(p) + list(f)) if (p or f) else L for p, f in zip(plans, fixes)]
        ids: dict[tuple, int] = {}  # history -> stream id

        def stream(history: tuple) -> int:
            return ids.setdefault(history, len(ids))

        at: list[list[int | None]] = [[None] * nb for _ in plans]  # each plan's stream per batch (None: not begun)
        states: dict[int, torch.Tensor] = {}
        # a rank holding no check window (data-parallel) runs no block: it only joins the gather below
        first = min(start) if nb else L
        # the blocks this call reads, in order: each one's successor is read ahead while it computes
        reads = [l for l in range(first, L) if any(start[i] <= l and l not in p for i, p in enumerate(plans))]
        read_next = dict(zip(reads, reads[1:]))
        for l in range(first, L):
            for i in (i for i in range(len(plans)) if start[i] == l):
                for b in range(nb):
                    s = at[i][b] = stream(("dense", l, b))
                    if s not in states:
                        states[s] = self._kept.block_input(l, b)
            # (plan, batch, its stream, the map it runs block l with) for every plan that runs block l
            steps = [(i, b, at[i][b], fixes[i][l][b] if l in fixes[i] else None)
                     for i, p in enumerate(plans) if start[i] <= l and l not in p for b in range(nb)]
            if steps:
                groups: dict[int, tuple[torch.Tensor | None, dict[int, int]]] = {}  # per map: {stream: batch}
                for _, b, s, T in steps:
                    groups.setdefault(id(T), (T, {}))[1].setdefault(s, b)
                new: dict[tuple[int, int], torch.Tensor] = {}  # (stream, map) -> the block's output
                # read once for every plan, map and fold of this round
                with self._kept.block(l, read_next.get(l)) as block:
                    for tid, (T, todo) in groups.items():
                        with patched(mlp_output_module(self.adapter, block), T) if T is not None \
                                else contextlib.nullcontext():
                            for s, b in todo.items():
                                new[s, tid] = self.call(block, l, states[s], b)
                for i, b, s, T in steps:
                    at[i][b] = stream((s, l, id(T)))
                    states.setdefault(at[i][b], new[s, id(T)])
            live = {s for row in at for s in row if s is not None}
            for s in [s for s in states if s not in live]:
                del states[s]  # no plan continues from it
        local = np.zeros((nb, len(plans) + 1), dtype=np.float64)  # per check batch: each plan's loss sum, terms
        sums: dict[int, float] = {}  # one head per distinct final stream
        with self._kept.non_block_modules() if nb else contextlib.nullcontext():
            for i, p in enumerate(plans):
                for b in range(nb):
                    s = at[i][b]
                    if s is None:  # nothing removed or mapped: the dense output
                        s = stream(("dense", L, b))
                        states.setdefault(s, self._kept.block_input(L, b))
                    if s not in sums:
                        sums[s] = float(self._loss_sum(states[s], b))
                    local[b, i] = sums[s]
        states.clear()
        for b in range(nb):
            local[b, -1] = G.loss_count(self._kind, self._kept.batches[b])
        # data-parallel: the check batches in the global window order (the 1-SE rule pairs them by window)
        table = dist.gather_rows(local, tag="check_losses")
        counts = [float(c) for c in table[:, -1]]
        out = []
        for i, p in enumerate(plans):
            sums = [float(x) for x in table[:, i]]
            value = sum(sums) / max(sum(counts), 1)
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError(f"verifier: the calibration loss with blocks {sorted(p)} removed is {value}; "
                                 "the pruned model overflows (use dtype float32)")
            out.append((value, [x / max(c, 1) for x, c in zip(sums, counts)]))
        return out

    def _loss_sum(self, hidden: torch.Tensor, batch: int) -> torch.Tensor:
        """Batch ``batch``'s loss terms when the last block returns ``hidden``.

        The calibration loss, except for encoders without a head: there the embedding distortion against
        the dense model (``gradients.embedding_distortion_sum``), not the pooled-energy proxy.
        """
        data = self._kept.batches[batch]
        output = self.adapter.head_output(hidden, data)
        if self._kind != "pooled_energy":
            return G.loss_sum(self._kind, output, data)
        if batch not in self._dense_pooled:
            dense = self.adapter.head_output(self._kept.block_input(self.num_blocks, batch), data)
            self._dense_pooled[batch] = G.mean_pooled(G.at_least_fp32(G.last_hidden(dense)),
                                                      G.token_mask(data).to(hidden.device))
        return G.embedding_distortion_sum(output, self._dense_pooled[batch], data)

    @contextlib.contextmanager
    def _eval_mode(self):
        model = self.adapter.model
        was_training = model.training
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)

    def close(self) -> None:
        if not self.closed:
            self._kept.close()
            self.closed = True
            self._memo.clear()
            self._stats.clear()
            self._fitted.clear()
            self.matrices.close()
            self._dense_pooled.clear()

    def __enter__(self) -> SkipVerifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _NoKeptInputs:
    """The kept inputs of a rank that keeps no window (data-parallel): no batch, nothing to run or free."""

    def __init__(self, adapter, loss_kind: str, total_windows: int) -> None:
        self.adapter, self.num_blocks, self.loss_kind = adapter, adapter.num_blocks, loss_kind
        self.total_windows, self.windows, self.batches, self.num_batches = total_windows, [], [], 0

    def close(self) -> None:
        pass


def _leading_batches(windows: Sequence[int], at_least: int, offset: int = 0) -> int:
    """How many leading batches hold at least ``at_least`` windows (all of them if there are fewer); the
    batches start at window ``offset`` of the whole set (data-parallel ranks after the first)."""
    total = offset
    for i, w in enumerate(windows):
        if total >= at_least:
            return i
        total += w
    return len(windows)
