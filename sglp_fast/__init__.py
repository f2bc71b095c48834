"""sglp-fast: similarity-guided layer-partition pruning (SGLP) of large pretrained models.

Data flow, one module per stage:
calibration (calibrate.py, offload.py, models/) -> similarity (cka.py, kernels/) -> segments (segment.py,
csrc/) -> scores (scoring.py) -> plan (plan.py) -> pruned model (pruning.py); evaluate.py, cli.py, api.py on top.

Heavy modules (torch, transformers) load on first use, so ``from sglp_fast import fisher_segment`` stays cheap.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "fisher_segment": "segment",
    "fisher_segment_costs": "segment",
    "Segmentation": "segment",
    "CKAAccumulator": "cka",
    "cka_matrix": "cka",
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
