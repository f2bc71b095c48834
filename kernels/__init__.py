"""Triton kernels for the streaming CKA engine, installed as ``sglp_fast.kernels``.

gram.py  fused Gram row panel (K̃ = XXᵀ with zeroed diagonal, its diagonal and row sums; fp32 accumulation
         from bf16/fp16/fp32), one launch for a stack of layers
hsic.py  G += F Fᵀ over a stack of layers' flattened panels (split-K, symmetric, fp32 accumulation)

Each launcher validates, allocates and launches (autotuned on CUDA; one small config under
TRITON_INTERPRET=1, which is how CI runs them on the CPU); ``*_ref`` are the float64 specs.
"""
from .gram import gram_panel, gram_panel_ref, interpreter_active
from .hsic import hsic_accumulate, hsic_accumulate_ref

__all__ = ["gram_panel", "gram_panel_ref", "hsic_accumulate", "hsic_accumulate_ref", "interpreter_active"]
