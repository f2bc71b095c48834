"""sglp-fast: similarity-guided layer-partition pruning (SGLP) of large pretrained models.

Data flow, one sub-package per stage, in order:
models/ (adapters, loading) -> calibration/ (layer-by-layer pass) -> similarity/ (CKA; Triton kernels in
kernels/) -> segmentation/ (Fisher, C++ in csrc/) -> selection/ (scores, selectors, verified search,
compensation) -> plan.py (the JSON plan) -> pruning/ (apply, save); api.py, cli.py, compare.py, evaluate.py
are the interfaces on top. No module imports one of a later stage (tests/test_layout.py).

Heavy modules (torch, transformers) load on first use, so ``from sglp_fast import fisher_segment`` stays cheap.
"""
from __future__ import annotations

import importlib

from .hub_kernels_guard import unshadow_hub_kernels

__version__ = "0.1.0"

unshadow_hub_kernels()  # before anything imports transformers (see hub_kernels_guard.py)

# public name -> module that defines it
_LAZY = {
    "fisher_segment": "segmentation",
    "fisher_segment_costs": "segmentation",
    "Segmentation": "segmentation",
    "CKAAccumulator": "similarity",
    "cka_matrix": "similarity",
    "calibrate": "calibration",
    "Plan": "plan",
    "analyze": "api",
    "prune": "api",
    "Analysis": "api",
    "PruneResult": "api",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sglp_fast' has no attribute {name!r}")
