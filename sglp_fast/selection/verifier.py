"""Calibration loss of the model with some blocks skipped, run from the cached dense block inputs.

Why: single-block scores miss interactions (removing neighbours costs more than the sum of their single
costs; docs/quality.md), so the default plan checks its choices against the real loss. The check is cheap:
the calibration forward already produced every block's dense input, so a plan that removes blocks R starts
at block min(R) from its cached input, runs the kept blocks after it and the head, on the first few
calibration windows only. Several plans are evaluated in one layer-major pass (each block's weights are
brought to the device once per pass, as in calibration), and results are memoized per removed set.
With ``compensated=True`` the plan is first compensated (``compensate.py``, fitted on the other cached
windows) and the loss is that of the compensated model. For an encoder without a head the "loss" is the
embedding distortion against the dense model (mean 1 - cos of the pooled embeddings), not the pooled-energy
proxy GradNorm backpropagates: a plan is judged by how far it moves what the model outputs.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from torch import nn

from .. import distributed as dist
from ..calibration import losses as G
from ..calibration.kept_inputs import KeptInputs
from ..checks import check_int
from .compensation import DEFAULT_ALPHA, fit_transforms, mlp_output_module, patched


class SkipVerifier:
    """``loss(removed)``: mean calibration loss on the check windows with blocks ``removed`` skipped.

    Built by the selection stage from the handle calibration returns (``calibrate(..., keep_inputs=m)
    .kept_inputs``): the leading kept batches holding >= ``verify_windows`` windows are the loss check, the
    other kept batches are what compensation is fitted on. It owns the handle: close it (``close()`` or
    ``with``). It implements ``protocols.Verifier`` (the search) and ``protocols.BlockRunner`` (compensation).
    """

    def __init__(self, kept: KeptInputs, verify_windows: int, window_offset: int = 0) -> None:
        check_int("verify_windows", verify_windows, 1)
        check_int("window_offset", window_offset, 0)
        self._kept = kept
        self.adapter = kept.adapter
        self.num_blocks = kept.num_blocks
        self._kind = kept.loss_kind
        self._windows = kept.windows
        # data-parallel (sglp_fast.distributed): this rank's kept batches start at global window
        # ``window_offset``; the check batches are the leading ones globally (on one rank or several), and
        # their losses are gathered in the global window order. Without a process group: offset 0, all local.
        self._nv = _leading_batches(kept.windows, verify_windows, window_offset)
        self.fit_batches = list(range(self._nv, kept.num_batches))
        self._check_windows, self._all_windows = (int(x) for x in dist.all_reduce_sum(
            np.array([sum(self._windows[:self._nv]), kept.total_windows], dtype=np.float64), tag="check_losses"))
        self._transforms: dict[tuple[frozenset[int], bool], dict[int, torch.Tensor]] = {}
        self._memo: dict[tuple[frozenset[int], bool, bool], tuple[float, list[float]]] = {}  # loss, per batch
        self._dense_pooled: dict[int, torch.Tensor] = {}  # headless encoders: the dense sentence embeddings
        self.window_block_forwards = 0  # block calls x windows, the work spent so far
        self.closed = False

    @classmethod
    def without_inputs(cls, adapter, loss_kind: str, total_windows: int, verify_windows: int,
                       window_offset: int) -> SkipVerifier:
        """Data-parallel: a rank that keeps none of the check or fit windows still joins every sum and gather."""
        return cls(_NoKeptInputs(adapter, loss_kind, total_windows), verify_windows, window_offset)

    @property
    def num_windows(self) -> int:
        """Windows the loss is checked on (over every rank)."""
        return self._check_windows

    # -- the pieces compensate.fit_transforms streams with --------------------------------------------
    def cached_input(self, layer: int, batch: int) -> torch.Tensor:
        """The dense model's input of block ``layer`` (``num_blocks``: the last block's output)."""
        return self._kept.block_input(layer, batch)

    def token_mask(self, batch: int) -> torch.Tensor:
        return self._kept.token_mask(batch)

    @contextlib.contextmanager
    def block(self, layer: int, transform: torch.Tensor | None = None) -> Iterator[nn.Module]:
        """Block ``layer`` on the device (with ``transform`` folded into its MLP output), released after."""
        with self._kept.block(layer) as block:
            if transform is None:
                yield block
            else:
                with patched(mlp_output_module(self.adapter, block), transform):
                    yield block

    def call(self, block: nn.Module, layer: int, hidden: torch.Tensor, batch: int) -> torch.Tensor:
        self.window_block_forwards += self._windows[batch]
        return self._kept.call(block, layer, hidden, batch)

    def transforms(self, removed: Iterable[int], alpha: float | None = None,
                   all_windows: bool = False) -> dict[int, torch.Tensor]:
        """The compensation maps of a plan (fitted once, memoized).

        Fitted on the windows the loss check does not use, so the check stays a held-out test; with
        ``all_windows`` (the chosen plan, once the check has done its job) on every cached window.
        """
        key = (self._check(removed), bool(all_windows))
        if key not in self._transforms:
            batches = range(self._kept.num_batches) if all_windows else self.fit_batches
            with self._eval_mode(), torch.no_grad():
                self._transforms[key] = fit_transforms(self, sorted(key[0]), DEFAULT_ALPHA if alpha is None else alpha,
                                                       batches=list(batches))
        return self._transforms[key]

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
    def losses(self, plans: Sequence[Iterable[int]], compensated: bool = False,
               base: Iterable[int] | None = None, all_windows: bool = False) -> list[float]:
        """The loss of each plan (a set of removed blocks); new plans share one pass over the blocks.

        ``base``: plans that add one block to it (the greedy's candidates) reuse its stream (same values).
        ``all_windows``: compensated with the maps fitted on every window (the final model; not held out).
        """
        return [value for value, _ in self._evaluated(plans, compensated, base, all_windows)]

    def batch_losses(self, plans: Sequence[Iterable[int]], compensated: bool = False,
                     all_windows: bool = False) -> list[list[float]]:
        """Each plan's mean loss per check batch (the spread the pick's one-standard-error rule needs)."""
        return [list(per_batch) for _, per_batch in self._evaluated(plans, compensated, None, all_windows)]

    def _evaluated(self, plans, compensated, base, all_windows) -> list[tuple[float, list[float]]]:
        """(loss, loss per check batch) of each plan, run once per plan and memoized."""
        keys = [(self._check(p), bool(compensated), bool(compensated and all_windows)) for p in plans]
        todo = list(dict.fromkeys(k for k in keys if k not in self._memo))
        if todo:
            fixes = [self.transforms(p, all_windows=final) if comp else {} for p, comp, final in todo]
            with self._eval_mode():
                shared = None if base is None else self._check(base)
                for key, result in zip(todo, self._run([p for p, _, _ in todo], fixes, shared)):
                    self._memo[key] = result
        return [self._memo[k] for k in keys]

    def _run(self, plans: list[frozenset[int]], fixes: list[dict[int, torch.Tensor]],
             base: frozenset[int] | None = None) -> list[tuple[float, list[float]]]:
        L, nb = self.num_blocks, self._nv
        start = [min(list(p) + list(f)) if (p or f) else L for p, f in zip(plans, fixes)]
        # plans base | {l} with l past base's first block branch off base's own stream at l instead of
        # re-running base's blocks from min(base): the same operations on the same tensors, far less work
        branch: dict[int, int] = {}
        if base:
            for i, (p, f) in enumerate(zip(plans, fixes)):
                extra = p - base
                if not f and base < p and len(extra) == 1 and min(extra) > min(base):
                    branch[i] = start[i] = min(extra)
        base_until = max(branch.values(), default=-1)
        states: dict[tuple[int, int], torch.Tensor] = {}
        # a rank holding no check window (data-parallel) runs no block: it only joins the gather below
        first = min(start + ([min(base)] if branch else [])) if nb else L
        for l in range(first, L):
            if branch and l == min(base):
                for b in range(nb):
                    states["base", b] = self._kept.block_input(l, b)
            active = [i for i, p in enumerate(plans) if start[i] <= l and l not in p]
            for i in (i for i in range(len(plans)) if start[i] == l):
                for b in range(nb):
                    states[i, b] = states["base", b] if i in branch else self._kept.block_input(l, b)
            if branch and l == base_until:  # every branch has its state: drop base's stream
                for b in range(nb):
                    states.pop(("base", b), None)
            run_base = bool(branch) and min(base) <= l < base_until and l not in base
            if not active and not run_base:
                continue
            plain = [i for i in active if l not in fixes[i]]
            if plain or run_base:
                with self.block(l) as block:
                    if run_base:
                        for b in range(nb):
                            states["base", b] = self.call(block, l, states["base", b], b)
                    for i in plain:
                        for b in range(nb):
                            states[i, b] = self.call(block, l, states[i, b], b)
            for i in (i for i in active if l in fixes[i]):
                with self.block(l, fixes[i][l]) as block:
                    for b in range(nb):
                        states[i, b] = self.call(block, l, states[i, b], b)
        local = np.zeros((nb, len(plans) + 1), dtype=np.float64)  # per check batch: each plan's loss sum, terms
        with self._kept.non_block_modules() if nb else contextlib.nullcontext():
            for i, p in enumerate(plans):
                for b in range(nb):
                    h = states.pop((i, b)) if (i, b) in states else self._kept.block_input(L, b)
                    local[b, i] = float(self._loss_sum(h, b))
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
            self._transforms.clear()
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
