"""Triton kernels for the streaming CKA engine, installed as ``sglp_fast.kernels``.

gram.py  fused Gram row panel (K̃ = XXᵀ with zeroed diagonal, its diagonal and row sums; fp32 accumulation
         from bf16/fp16/fp32), one launch for a stack of layers
hsic.py  G += F Fᵀ over a stack of layers' flattened panels (split-K, symmetric, fp32 accumulation, no
         atomics: the same bits every run)

Each launcher validates, allocates and launches (autotuned on CUDA; one small config under
TRITON_INTERPRET=1, which is how CI runs them on the CPU); ``*_ref`` are the float64 specs.

Importing this package imports no Triton: the names below load their module on first use (PEP 562). This is
what keeps the folder harmless where it is. It sits at the top of the repository (setuptools maps it to
``sglp_fast.kernels``), so a Python started in the repository root also sees it as a top-level package
``kernels``, the import name of Hugging Face's kernel-hub package. transformers probes that name
(``is_kernels_available`` -> ``_is_package_available("kernels", return_version=True)``): ``find_spec`` finds
this folder, no installed distribution carries its version, so transformers imports the package to read its
``__version__``. Importing triton here would make that probe raise wherever triton is missing, which surfaces
as "Could not import module 'LlamaConfig'" from ``AutoModelForCausalLM.from_pretrained``. Lazily, the import
succeeds without triton, the version reads "N/A", and transformers concludes (correctly) that the kernel hub
is not installed. So: never import triton at the top of this file, and never define ``__version__`` here.
tests/test_kernels.py checks this in a subprocess started in the repository root with triton hidden.
"""
from __future__ import annotations

from importlib import import_module

_EXPORTS = {
    "gram_panel": "gram",
    "gram_panel_ref": "gram",
    "interpreter_active": "gram",
    "hsic_accumulate": "hsic",
    "hsic_accumulate_ref": "hsic",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:  # also how `from . import gram` falls through to importing the submodule
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
