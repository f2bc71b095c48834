"""Training-free compensation of removed blocks: one least-squares linear map per removed run, folded into
the MLP output projection of the block just before the run (after ReplaceMe, Shopkhoev et al. 2025).

Why: a removed run a..b leaves the residual stream short of the update those blocks made. The block before
the run, p = a-1, adds its MLP output m to the stream (out_p = h_mid + m). Replacing m by m @ T with
T = I + D, where D solves the ridge problem

    min_D  sum_tokens w_t^2 || m_t (I + D) - (y_t - h_mid_t) ||^2 + lam ||D||_F^2,
    y = the dense model's input of block b+1,  w_t = 1 / ||y_t - h_mid_t||,  lam = alpha * tr(X^T W X) / d

puts back the part of the missing update that is linear in m. T folds exactly into the projection's
weights (nn.Linear: W <- T^T W, b <- b T; GPT-2 Conv1D: W <- W T, b <- b T), so the saved model has the
standard architecture, no extra parameters, and loads with plain ``from_pretrained``. No gradient step:
one d x d solve per run. The row weights w keep the few massive-activation tokens from dominating the fit.

Runs are fitted in order on the pruned model's own stream (earlier runs already compensated), on the
calibration windows the verified search does NOT use for its loss check, so that check is an honest
held-out test: a fit that does not generalize loses there and the uncompensated plan is kept. Once the
search has chosen, the chosen plan's maps are refitted on every calibration window (the check has done its
job; a third more data for the same d x d maps).
A run starting at block 0 has no block before it and stays uncompensated.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .. import distributed as dist
from ..calibration import lazy_weights
from ..models.base import resolve_path
from .protocols import BlockRunner

DEFAULT_ALPHA = 1.0


def runs_of(removed: Iterable[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive removed blocks, as inclusive (first, last) pairs."""
    runs: list[list[int]] = []
    for i in sorted(set(int(x) for x in removed)):
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return [(a, b) for a, b in runs]


def mlp_output_module(adapter: Any, block: nn.Module) -> nn.Module:
    """The projection whose output the block adds to the residual stream, or a clear error."""
    path = adapter.mlp_output_path()
    if not path:
        raise ValueError(f"compensate: not supported for {adapter.family} models ({getattr(adapter.config, 'model_type', '?')}): "
                         "their MLP output is not added straight to the residual stream; use compensate=False "
                         "(--no-compensate)")
    return resolve_path(block, path)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def folded(module: nn.Module, T: torch.Tensor) -> dict[str, torch.Tensor]:
    """The projection's new {"weight", "bias"} with ``T`` folded in (computed in float64, cast back)."""
    W = module.weight.detach()
    T64 = T.to(W.device, torch.float64)
    width = W.shape[1] if _is_conv1d(module) else W.shape[0]
    if tuple(T64.shape) != (width, width):
        raise ValueError(f"compensate: a map of shape {tuple(T64.shape)} does not fit this model's hidden size "
                         f"{width}; the plan's compensation maps were made for another model: re-plan")
    if _is_conv1d(module):  # y = x W + b, W [in, out]
        new = {"weight": (W.double() @ T64).to(W.dtype)}
    elif isinstance(module, nn.Linear):  # y = x W^T + b, W [out, in]
        new = {"weight": (T64.T @ W.double()).to(W.dtype)}
    else:
        raise ValueError(f"compensate: the MLP output module is a {type(module).__name__}, expected nn.Linear or "
                         "Conv1D; use compensate=False")
    if getattr(module, "bias", None) is not None:
        new["bias"] = (module.bias.detach().double() @ T64).to(module.bias.dtype)
    return new


def fold_state_tensor(kind: str, name: str, tensor: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """``folded`` for one checkpoint tensor (``kind`` "linear" or "conv1d", ``name`` "weight" or "bias")."""
    t64, T64 = tensor.double(), T.double()
    width = tensor.shape[-1] if (name == "bias" or kind == "conv1d") else tensor.shape[0]
    if tuple(T64.shape) != (width, width):
        raise ValueError(f"compensate: a map of shape {tuple(T64.shape)} does not fit this checkpoint's hidden "
                         f"size {width}; the plan's compensation maps were made for another model: re-plan")
    if name == "bias":
        out = t64 @ T64
    elif kind == "conv1d":
        out = t64 @ T64
    else:
        out = T64.T @ t64
    return out.to(tensor.dtype)


def module_kind(module: nn.Module) -> str:
    return "conv1d" if _is_conv1d(module) else "linear"


@contextlib.contextmanager
def patched(module: nn.Module, T: torch.Tensor | None):
    """The projection with ``T`` folded in for the duration (exactly restored after)."""
    if T is None:
        yield module
        return
    new = folded(module, T)
    saved = {name: getattr(module, name).data for name in new}
    try:
        for name, value in new.items():
            getattr(module, name).data = value
        yield module
    finally:
        for name, value in saved.items():
            getattr(module, name).data = value


def fit_transforms(verifier: BlockRunner, removed: Sequence[int], alpha: float = DEFAULT_ALPHA,
                   batches: Sequence[int] | None = None) -> dict[int, torch.Tensor]:
    """{block p: T (float64, CPU)} for every removed run a..b with a >= 1 (p = a - 1), fitted in order.

    ``batches``: the cached batches to fit on (default: ``verifier.fit_batches``, those the loss check does
    not use). After a fit, the block's new output is ``out + m (T - I)`` exactly when the block adds its MLP
    output straight to the stream; that is checked once, on the first batch, against a real call.
    """
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise ValueError(f"compensate_alpha: expected a positive number (ridge strength), got {alpha!r}")
    gone = set(int(i) for i in removed)
    target_of = {a - 1: b + 1 for a, b in runs_of(gone) if a >= 1}
    fit = list(verifier.fit_batches if batches is None else batches)
    if not target_of:
        return {}
    # data-parallel: the fit windows are spread over the ranks (some may hold none); the sums are global, and
    # the additivity check below runs once, on the first rank holding fit windows (as in one process)
    per_rank = dist.gather_lists([len(fit)], tag="compensation")
    checks = next((r for r, n in enumerate(per_rank) if n), None) == dist.rank()
    if not any(per_rank):
        raise ValueError("compensate: no calibration windows left to fit on (the loss check uses them all); "
                         "use more calibration windows than verify_windows, or compensate=False")
    transforms: dict[int, torch.Tensor] = {}
    first, last = min(target_of), max(target_of)
    states = {b: verifier.cached_input(first, b) for b in fit}
    for l in range(first, last + 1):
        if l in gone:
            continue
        if not fit:  # this rank holds no fit window: it only joins each map's sums
            if l in target_of:
                transforms[l] = _solve(verifier, fit, {}, {}, target_of[l], alpha)
            continue
        with verifier.block(l, transforms.get(l)) as block:
            if l not in target_of:
                for b in fit:
                    states[b] = verifier.call(block, l, states[b], b)
                continue
            proj = mlp_output_module(verifier.adapter, block)
            outs, mlps = {}, {}
            hook = proj.register_forward_hook(lambda mod, inp, out: mlps.__setitem__("m", out))
            try:
                for b in fit:
                    outs[b] = verifier.call(block, l, states[b], b)
                    mlps[b] = mlps.pop("m")
            finally:
                hook.remove()
            T = _solve(verifier, fit, outs, mlps, target_of[l], alpha)
            transforms[l] = T
        if checks:
            with verifier.block(l, T) as block:
                real = verifier.call(block, l, states[fit[0]], fit[0])
        D = T - torch.eye(T.shape[0], dtype=T.dtype)
        for b in fit:  # a block that adds m to the stream outputs out + m (T - I) with T folded in
            states[b] = (outs[b].double() + mlps[b].double() @ D.to(mlps[b].device)).to(outs[b].dtype)
        if checks:
            _check_additive(real, states[fit[0]], l)
    return transforms


def _solve(verifier: BlockRunner, fit, outs, mlps, target_slot: int, alpha: float) -> torch.Tensor:
    gram = rhs = None
    for b in fit:
        mask = verifier.token_mask(b)
        m = mlps[b].double()[mask]
        h_mid = outs[b].double()[mask] - m
        need = verifier.cached_input(target_slot, b).double()[mask] - h_mid
        w = 1.0 / need.norm(dim=1, keepdim=True).clamp_min(1e-12)
        X, Y = m * w, (need - m) * w
        g, r = X.T @ X, X.T @ Y
        gram, rhs = (g, r) if gram is None else (gram + g, rhs + r)
    if dist.is_distributed():  # the sums over every rank's fit windows; solved on the CPU alike on every rank
        if gram is None:
            width = int(verifier.adapter.config.hidden_size)
            gram, rhs = (torch.zeros(width, width, dtype=torch.float64) for _ in range(2))
        gram, rhs = gram.cpu(), rhs.cpu()
        dist.all_reduce_tensors_([gram, rhs], tag="compensation", dtype=torch.float64)
    d = gram.shape[0]
    lam = alpha * torch.trace(gram) / d
    eye = torch.eye(d, dtype=gram.dtype, device=gram.device)
    D = torch.linalg.solve(gram + lam * eye, rhs)
    return (eye + D).cpu()


def _check_additive(real: torch.Tensor, expect: torch.Tensor, layer: int) -> None:
    """The folded block's real output must equal out + m (T - I); otherwise the architecture is not additive."""
    err = float((real.double() - expect.double()).norm() / expect.double().norm().clamp_min(1e-30))
    tol = 1e-4 if real.dtype in (torch.float32, torch.float64) else 5e-2
    if not err <= tol:
        raise ValueError(f"compensate: block {layer} does not add its MLP output straight to the residual stream "
                         f"(relative mismatch {err:.2e}); this architecture cannot be compensated, use "
                         "compensate=False (--no-compensate)")


def apply_transforms(adapter: Any, transforms: dict[int, torch.Tensor]) -> None:
    """Fold the fitted maps into the model's projections in place (before removing the blocks); a lazily
    loaded model folds each map whenever its block is read."""
    blocks = adapter.blocks
    for l, T in transforms.items():
        if lazy_weights.is_lazy(adapter.model):
            lazy_weights.on_load(adapter.model, blocks[int(l)], lambda block, T=T: _fold(adapter, block, T))
        else:
            _fold(adapter, blocks[int(l)], T)


def _fold(adapter: Any, block: nn.Module, T: torch.Tensor) -> None:
    proj = mlp_output_module(adapter, block)
    for name, value in folded(proj, T).items():
        getattr(proj, name).data = value
