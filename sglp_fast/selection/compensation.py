"""Training-free compensation of removed blocks: one linear map per removed run, folded into the MLP output
projection of the block just before the run (after ReplaceMe, Shopkhoev et al. 2025).

Why: a removed run a..b leaves the residual stream short of the update those blocks made. The block before
the run, p = a-1, adds its MLP output m to the stream (out_p = h_mid + m). Replacing m by m @ T with
T = I + D, D a (ridge) least-squares solution of  m D ~ y - h_mid - m  (y: the dense input of
block b+1), puts back the part of the missing update that is linear in m. T folds exactly into the
projection's weights (nn.Linear: W <- T^T W, b <- b T; GPT-2 Conv1D: W <- W T, b <- b T), so the saved model
has the standard architecture, no extra parameters, and loads with plain ``from_pretrained``. No gradient step.

Where the pieces live: ``run_statistics.py`` accumulates each run's XᵀX / XᵀY per fold in one pass over the
blocks, ``regularization.py`` chooses each map's ridge strength and shrinkage on held-out folds (or drops
the map), the verifier (``verifier.py``) checks compensated plans cross-fitted. This module folds a map into
a projection (in memory, patched for a while, or into a checkpoint tensor). A run starting at block 0 has no
block before it and stays uncompensated.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..calibration import lazy_weights, memory
from ..models.base import resolve_path


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
        new = {"weight": _times_map(W, T64, "conv1d")}
    elif isinstance(module, nn.Linear):  # y = x W^T + b, W [out, in]
        new = {"weight": _times_map(W, T64, "linear")}
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
        return (t64 @ T64).to(tensor.dtype)
    return _times_map(tensor, T64, kind)


def _times_map(W: torch.Tensor, T64: torch.Tensor, kind: str) -> torch.Tensor:
    """Tᵀ W ("linear", W [out, in]) or W T ("conv1d", W [in, out]) in float64, cast back to W's dtype, a
    slice of W's other dimension at a time (a 70B down projection is 1.75 GiB in float64: slices keep the
    fold's temporaries at ``memory.FOLD_SLICE_BYTES``; each output element is the same dot product)."""
    FOLD_SLICE_BYTES = memory.FOLD_SLICE_BYTES
    out = torch.empty_like(W)
    if kind == "conv1d":
        step = max(1, FOLD_SLICE_BYTES // (8 * W.shape[1]))
        for i in range(0, W.shape[0], step):
            out[i:i + step] = (W[i:i + step].double() @ T64).to(W.dtype)
    else:
        step = max(1, FOLD_SLICE_BYTES // (8 * W.shape[0]))
        for j in range(0, W.shape[1], step):
            out[:, j:j + step] = (T64.T @ W[:, j:j + step].double()).to(W.dtype)
    return out


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
