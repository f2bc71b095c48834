"""Sufficient statistics of a removed run's compensation map, accumulated per fold in float64.

Why statistics and not activations: a run a..b's least-squares map (``compensation.py``) only needs
G = XᵀX and C = XᵀY, where X is the MLP output m of the block before the run, p = a-1, and Y = (the dense
input of block b+1) - (the dense output of block p): the update the run made, which the map must put back
(with T = I + D folded in, block p outputs out + m D). Both are d x d, whatever the number of tokens, so a
fit can use every calibration window (and extra fit-only windows) without keeping them. Kept per fold (the
check's cross-fitting folds, plus a "train" slot for windows that are never held out), so that the map of
"every fold but f" is G - G_f, C - C_f and its held-out error on fold f is known exactly:

    err_f(D) = tr(Y_fᵀY_f) - 2 tr(Dᵀ C_f) + tr(Dᵀ G_f D).

With ``weighted``, rows are weighted by w_t = 1 / ||y_t - h_mid_t||, the norm of the token's missing update, so
the few massive-activation tokens do not dominate the fit (rounds 4-7's default, the policy ``cv-weighted``);
the default and ReplaceMe fit unweighted rows (regularization.py, docs/quality.md round 8).

All runs are fitted on the DENSE model's stream (as ReplaceMe does): a run's statistics do not depend on the
other runs of a plan, so every candidate plan that removes the same run shares them, and one pass that
reads each needed block once serves every candidate of a search round.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import torch

from .. import distributed as dist
from ..calibration.losses import at_least_fp32
from .compensation import mlp_output_module, patched
from .matrix_store import MatrixStore
from .protocols import BlockRunner


@dataclasses.dataclass
class RunStatistics:
    """G = XᵀX and C = XᵀY per fold (slot ``folds``: windows never held out), float64 on the CPU."""

    gram: torch.Tensor     # [folds + 1, d, d]
    cross: torch.Tensor    # [folds + 1, d, d]
    energy: torch.Tensor   # [folds + 1]: tr(YᵀY), the held-out error of no map
    tokens: torch.Tensor   # [folds + 1]: rows accumulated

    @classmethod
    def zeros(cls, folds: int, width: int, store: MatrixStore | None = None) -> RunStatistics:
        """Zero statistics; the d x d ones from ``store`` (in memory up to its room, then on disk)."""
        big = store.zeros if store is not None else lambda *shape: torch.zeros(*shape, dtype=torch.float64)
        small = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        return cls(big(folds + 1, width, width), big(folds + 1, width, width), small(folds + 1), small(folds + 1))

    @property
    def folds(self) -> int:
        return self.gram.shape[0] - 1

    def add(self, slot: int, X: torch.Tensor, Y: torch.Tensor) -> None:
        """One batch's rows into ``slot``: in place where the statistics live (no d x d temporary), else the
        products copied here (``SlotSums`` sums a slot's batches on their device first)."""
        X, Y = X.double(), Y.double()
        if X.device == self.gram.device:
            self.gram[slot].addmm_(X.T, X)
            self.cross[slot].addmm_(X.T, Y)
        else:
            self.gram[slot] += (X.T @ X).cpu()
            self.cross[slot] += (X.T @ Y).cpu()
        self.energy[slot] += float((Y * Y).sum())
        self.tokens[slot] += X.shape[0]

    def add_statistics(self, slot: int, other: RunStatistics) -> None:
        """Add every slot of ``other`` (e.g. fit-only windows' statistics) into ``slot``."""
        self.gram[slot] += other.gram.sum(0)
        self.cross[slot] += other.cross.sum(0)
        self.energy[slot] += other.energy.sum()
        self.tokens[slot] += other.tokens.sum()

    def without(self, fold: int | None, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(G, C) summed over every slot but ``fold`` (None: every slot), on ``device`` (None: here): one
        d x d each there, no stacked copy, nothing d x d left on the host when the sum is made elsewhere."""
        keep = [s for s in range(self.folds + 1) if s != fold]
        out = []
        for stack in (self.gram, self.cross):
            total = torch.zeros(stack.shape[1:], dtype=stack.dtype, device=stack.device if device is None else device)
            for s in keep:
                total += stack[s].to(total.device)
            out.append(total)
        return out[0], out[1]

    def all_reduce_(self) -> None:
        """Data-parallel: the sums over every rank's windows (identical on every rank after)."""
        dist.all_reduce_tensors_([self.gram, self.cross, self.energy, self.tokens], tag="compensation",
                                 dtype=torch.float64)


def accumulate(runner: BlockRunner, runs: Iterable[tuple[int, int]], fold_of_batch: Sequence[int], folds: int,
               weighted: bool = True, check: bool = True, store: MatrixStore | None = None
               ) -> dict[tuple[int, int], RunStatistics]:
    """Statistics of every run (first, last), first >= 1, over every kept batch; each block read once.

    ``fold_of_batch[b]``: the fold kept batch ``b`` belongs to (``folds`` = never held out). ``check``: test
    once that the architecture adds the MLP output straight to the stream (data-parallel: one rank does).
    ``store``: where the d x d statistics live (None: plain memory).
    """
    runs = sorted(set((int(a), int(b)) for a, b in runs))
    if any(a < 1 for a, _ in runs):
        raise ValueError("compensate: a run starting at block 0 has no block before it to fold a map into")
    width = int(runner.adapter.config.hidden_size)
    stats = {run: RunStatistics.zeros(folds, width, store) for run in runs}
    checked = not check
    before = sorted({a - 1 for a, _ in runs})
    read_next = dict(zip(before, before[1:]))  # each block's successor is read ahead while it computes
    for p in before:
        targets = [(run, run[1] + 1) for run in runs if run[0] - 1 == p]
        if not len(fold_of_batch):
            continue  # data-parallel: this rank keeps no window; it only joins the sums below
        with runner.block(p, next_layer=read_next.get(p)) as block:
            proj = mlp_output_module(runner.adapter, block)
            # where the statistics live (the CPU) every run of block p sums in place in one pass; on a GPU
            # each run's sums stay on it (one run at a time: the memory plan's one batch's XᵀX and XᵀY), the
            # block re-run per run rather than a d x d copy to the host per batch
            host = _sums_in_place(block, stats[targets[0][0]])
            for group in ([targets] if host else [[t] for t in targets]):
                sums = {run: SlotSums(stats[run], in_place=host) for run, _ in group}
                for b, slot in enumerate(fold_of_batch):
                    out, m = _call_with_mlp_output(runner, block, proj, p, b)
                    if not checked:
                        _check_additive(runner, block, proj, p, b, out, m)
                        checked = True
                    mask = runner.token_mask(b)
                    m64, h_mid = m.double()[mask], (out.double() - m.double())[mask]
                    for run, t in group:
                        need = runner.cached_input(t, b).double()[mask] - h_mid
                        w = 1.0 / need.norm(dim=1, keepdim=True).clamp_min(1e-12) if weighted else 1.0
                        sums[run].add(slot, m64 * w, (need - m64) * w)
                for run_sums in sums.values():
                    run_sums.flush()
    if dist.is_distributed():
        for run in runs:
            stats[run].all_reduce_()
    return stats


def _sums_in_place(block: torch.nn.Module, stats: RunStatistics) -> bool:
    """Whether the block's rows are on the device the statistics live on (the CPU: sum in place)."""
    param = next(block.parameters(), None)
    return param is None or param.device == stats.gram.device


class SlotSums:
    """One run's XᵀX, XᵀY, tr(YᵀY) and rows over consecutive batches of one slot, added to its statistics.

    ``in_place``: the rows are where the statistics are (the CPU): each batch goes straight in
    (``RunStatistics.add``). Else (a GPU) the sums stay on the rows' device and reach the host statistics once
    per slot (the folds are contiguous: folds + 1 copies per run). Why: at d = 8192 one XᵀX is 512 MiB, and a
    copy to the host and an add there per batch and run is far more than the product on the GPU (an estimate
    from the sizes, not measured: the H200 run of scale_gpu.md predates this and has no split of its plan
    stage)."""

    def __init__(self, stats: RunStatistics, in_place: bool) -> None:
        self.stats, self.in_place = stats, in_place
        self.slot: int | None = None
        self.gram = self.cross = None
        self.energy = self.tokens = 0

    def add(self, slot: int, X: torch.Tensor, Y: torch.Tensor) -> None:
        if self.in_place:
            self.stats.add(slot, X, Y)
            return
        if slot != self.slot:
            self.flush()
            self.slot = slot
        if self.gram is None:
            self.gram = X.new_zeros(X.shape[1], X.shape[1])
            self.cross = X.new_zeros(X.shape[1], Y.shape[1])
        self.gram.addmm_(X.T, X)
        self.cross.addmm_(X.T, Y)
        self.energy = self.energy + (Y * Y).sum()  # on the device: no sync per batch
        self.tokens += X.shape[0]

    def flush(self) -> None:
        """The current slot's sums into the statistics (host), the device sums zeroed for the next slot."""
        if self.in_place or self.slot is None or self.gram is None:
            return
        self.stats.gram[self.slot] += self.gram.cpu()
        self.stats.cross[self.slot] += self.cross.cpu()
        self.stats.energy[self.slot] += float(self.energy)
        self.stats.tokens[self.slot] += self.tokens
        self.gram.zero_()
        self.cross.zero_()
        self.energy, self.tokens = 0, 0


def _call_with_mlp_output(runner, block, proj, layer: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(block output, the MLP output projection's output) for one kept batch."""
    seen = {}
    hook = proj.register_forward_hook(lambda mod, inp, out: seen.__setitem__("m", out))
    try:
        out = runner.call(block, layer, runner.cached_input(layer, batch), batch)
    finally:
        hook.remove()
    if "m" not in seen:
        raise ValueError(f"compensate: block {layer} never called its MLP output projection; this architecture "
                         "cannot be compensated, use compensate=False (--no-compensate)")
    return out, seen["m"]


def _check_additive(runner, block, proj, layer: int, batch: int, out: torch.Tensor, m: torch.Tensor) -> None:
    """Doubling the projection must add m once more to the block's output; else the map would not fold."""
    eye2 = 2.0 * torch.eye(m.shape[-1], dtype=torch.float64)
    with patched(proj, eye2):
        real = runner.call(block, layer, runner.cached_input(layer, batch), batch)
    expect = out.double() + m.double()
    err = float((real.double() - expect).norm() / expect.norm().clamp_min(1e-30))
    tol = 1e-4 if real.dtype in (torch.float32, torch.float64) else 5e-2
    if not err <= tol:
        raise ValueError(f"compensate: block {layer} does not add its MLP output straight to the residual stream "
                         f"(relative mismatch {err:.2e}); this architecture cannot be compensated, use "
                         "compensate=False (--no-compensate)")


class FitOnlyObserver:
    """``calibrate`` observer that accumulates the statistics of ``runs`` from windows nobody else sees.

    Why an observer: the fit-only windows (``fit_windows``) need only a forward pass, which calibration
    already streams block by block under the memory plan; they are never kept. A forward hook on the MLP
    output projection of each block before a run records m of each block call; ``observe`` takes each batch's
    rows from them in order (a call may hold several batches: ``calibrate``'s ``windows_per_call``). Its X
    and the block's output wait (one batch's worth per run) until the run's target block input is reached.
    """

    def __init__(self, adapter, runs: Sequence[tuple[int, int]], weighted: bool) -> None:
        self.adapter, self.weighted = adapter, weighted
        self.runs = sorted(runs)
        width = int(adapter.config.hidden_size)
        self.stats = {run: RunStatistics.zeros(0, width) for run in self.runs}
        self._pending: dict[tuple[tuple[int, int], int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._seen: dict[int, list[torch.Tensor]] = {}  # per block: its calls' MLP outputs not yet observed
        self._hooks = []
        self._hooked = sorted({a - 1 for a, _ in self.runs})
        for p in self._hooked:
            proj = mlp_output_module(adapter, adapter.blocks[p])
            self._hooks.append(proj.register_forward_hook(
                lambda mod, inp, out, p=p: self._seen.setdefault(p, []).append(out.detach())))

    def _take(self, layer: int, rows: int) -> torch.Tensor:
        """The next ``rows`` windows of block ``layer``'s hooked MLP outputs, in call order."""
        queue = self._seen.get(layer) or []
        if not queue or queue[0].shape[0] < rows:
            raise RuntimeError(f"fit-only statistics: block {layer}'s MLP output of this batch was not "
                               "recorded (its calls and the observed batches disagree); pass "
                               "windows_per_call=1")
        head = queue[0]
        if head.shape[0] == rows:
            queue.pop(0)
            return head
        queue[0] = head[rows:]
        return head[:rows]

    def observe(self, layer: int, block_input: torch.Tensor, block_output: torch.Tensor, batch: int,
                mask: torch.Tensor) -> None:
        mask = mask.to(block_output.device)
        m_here = self._take(layer, block_output.shape[0]) if layer in self._hooked else None
        for run in self.runs:
            p, t = run[0] - 1, run[1] + 1
            if layer == p:
                m = at_least_fp32(m_here)[mask]  # float32 while waiting: half the memory of float64
                self._pending[run, batch] = (m.cpu(), block_output[mask].cpu())
            if layer == t - 1:  # block t's input is this block's output
                m, out = (x.double() for x in self._pending.pop((run, batch)))
                y = block_output.double()[mask].cpu()
                need = y - (out - m)
                w = 1.0 / need.norm(dim=1, keepdim=True).clamp_min(1e-12) if self.weighted else 1.0
                self.stats[run].add(0, m * w, (need - m) * w)

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
