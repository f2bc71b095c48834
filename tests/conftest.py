"""Shared test set-up: Triton runs in its interpreter without a GPU; tests marked ``gpu`` skip without one."""
from __future__ import annotations

import os

# Must happen before anything imports triton: CI has no GPU, so kernels run under the interpreter.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch missing fails later with a clear ImportError
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import sglp_fast  # noqa: F401  (first: its import keeps the checkout's kernels/ from shadowing HF's kernels)


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)

