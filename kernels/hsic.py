"""Stacked HSIC products: G += F Fᵀ over a stack of layers, accumulated panel by panel.

For L layers and one row panel P of their centered, diagonal-zeroed Grams, F is the L×m matrix whose row l
is the flattened panel K̃_l[P, :] (m = |P|·n). The unbiased HSIC of every layer pair needs

    G_ij = Σ_ab K̃_i[a, b] K̃_j[a, b] = Σ_P (F_P F_Pᵀ)_ij

(plus R Rᵀ and s sᵀ from the row sums, which use this same kernel with F = R, m = n). Summing over panels
means no layer's full n×n Gram has to exist at once: peak memory is the L×|P|×n panel stack.

The kernel is a split-K GEMM with a tiny output (L×L) and a huge reduction (m up to ~10⁷): programs own
(BLOCK_L × BLOCK_L) output tiles and a contiguous chunk of the reduction, accumulate in fp32 registers with
fp32-accurate products (compiled: "tf32x3", three tf32 tensor-core products per fp32 product, error ~1e-7
relative, several times the fp32 FMA rate; plain tf32 would lose 1e-5 accuracy; interpreter: IEEE fp32),
and add their partial into
the caller-owned fp32 output with one atomic add per element. Only tiles with i-tile <= j-tile run; the
launcher mirrors the upper triangle, halving the work (G is symmetric).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gram import check_triton_device, interpreter_active

HSIC_CONFIGS = [
    triton.Config({"BLOCK_L": 64, "BLOCK_K": 64, "CHUNK": 8192}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_L": 64, "BLOCK_K": 128, "CHUNK": 16384}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_L": 32, "BLOCK_K": 128, "CHUNK": 8192}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_L": 32, "BLOCK_K": 64, "CHUNK": 4096}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_L": 128, "BLOCK_K": 32, "CHUNK": 16384}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_L": 128, "BLOCK_K": 64, "CHUNK": 16384}, num_warps=8, num_stages=3),
]
INTERPRETER_CONFIG = {"BLOCK_L": 16, "BLOCK_K": 32, "CHUNK": 256}
SMALL_PROBLEM = 1 << 22  # elements of F below which a fixed config is used (no tuning)
SMALL_CONFIG = triton.Config({"BLOCK_L": 32, "BLOCK_K": 64, "CHUNK": 4096}, num_warps=4, num_stages=3)


@triton.jit
def _hsic_kernel(
    F_ptr, G_ptr,
    num_layers, m,
    stride_fl, stride_fm, stride_gi, stride_gj,
    PRECISION: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr,
):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_k = tl.program_id(2)
    if pid_i <= pid_j:  # upper block triangle only; the launcher mirrors it
        offs_i = pid_i * BLOCK_L + tl.arange(0, BLOCK_L).to(tl.int64)  # L·m can pass 2³¹ elements
        offs_j = pid_j * BLOCK_L + tl.arange(0, BLOCK_L).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
        i_ok = offs_i < num_layers
        j_ok = offs_j < num_layers
        k_begin = pid_k.to(tl.int64) * CHUNK
        acc = tl.zeros((BLOCK_L, BLOCK_L), dtype=tl.float32)
        for k0 in range(k_begin, k_begin + CHUNK, BLOCK_K):
            k_ok = (k0 + offs_k) < m
            a = tl.load(
                F_ptr + offs_i[:, None] * stride_fl + (k0 + offs_k)[None, :] * stride_fm,
                mask=i_ok[:, None] & k_ok[None, :], other=0.0,
            )
            b = tl.load(
                F_ptr + offs_j[None, :] * stride_fl + (k0 + offs_k)[:, None] * stride_fm,
                mask=k_ok[:, None] & j_ok[None, :], other=0.0,
            )
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        tl.atomic_add(
            G_ptr + offs_i[:, None] * stride_gi + offs_j[None, :] * stride_gj,
            acc,
            mask=i_ok[:, None] & j_ok[None, :],
        )


_hsic_kernel_tuned = triton.autotune(
    configs=HSIC_CONFIGS, key=["num_layers", "m"], reset_to_zero=["G_ptr"]
)(_hsic_kernel)


def hsic_accumulate(f: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Add F Fᵀ (fp32) into ``out`` ([L, L] float32, caller-owned) and return it; F is [L, m] float32."""
    if not isinstance(f, torch.Tensor):
        raise TypeError(f"f: expected a torch.Tensor [num_layers, m], got {type(f).__name__}")
    if f.ndim != 2:
        raise ValueError(f"f: expected a 2-D [num_layers, m] tensor, got shape {tuple(f.shape)}; "
                         "flatten each layer's panel into one row")
    if f.dtype != torch.float32:
        raise TypeError(f"f: expected float32 (the Gram panels), got {f.dtype}; cast with f.float()")
    check_triton_device(f, "f")
    num_layers, m = f.shape
    if out is None:
        out = torch.zeros((num_layers, num_layers), device=f.device, dtype=torch.float32)
    elif out.shape != (num_layers, num_layers) or out.dtype != torch.float32 or out.device != f.device:
        raise ValueError(
            f"out: expected float32 [{num_layers}, {num_layers}] on {f.device}, got {out.dtype} "
            f"{tuple(out.shape)} on {out.device}; pass out=None to start from zeros"
        )
    if m == 0 or num_layers == 0:
        return out
    # the kernel fills the upper block triangle of a scratch buffer; mirror it, then add into `out`
    scratch = torch.zeros_like(out)
    small = num_layers * m < SMALL_PROBLEM
    if interpreter_active() or f.device.type != "cuda" or small:
        cfg = INTERPRETER_CONFIG if (interpreter_active() or f.device.type != "cuda") else SMALL_CONFIG.kwargs
        launch = {} if cfg is INTERPRETER_CONFIG else {"num_warps": SMALL_CONFIG.num_warps,
                                                       "num_stages": SMALL_CONFIG.num_stages}
        tiles = triton.cdiv(num_layers, cfg["BLOCK_L"])
        grid = (tiles, tiles, triton.cdiv(m, cfg["CHUNK"]))
        _hsic_kernel[grid](
            f, scratch, num_layers, m, f.stride(0), f.stride(1), scratch.stride(0), scratch.stride(1),
            PRECISION="ieee" if cfg is INTERPRETER_CONFIG else "tf32x3", **cfg, **launch,
        )
        block = cfg["BLOCK_L"]
    else:
        def grid(meta):
            tiles = triton.cdiv(num_layers, meta["BLOCK_L"])
            return (tiles, tiles, triton.cdiv(m, meta["CHUNK"]))

        tuned_before = len(_hsic_kernel_tuned.cache)
        args = (f, scratch, num_layers, m, f.stride(0), f.stride(1), scratch.stride(0), scratch.stride(1))
        _hsic_kernel_tuned[grid](*args, PRECISION="tf32x3")
        if len(_hsic_kernel_tuned.cache) != tuned_before:
            # this call benchmarked the configs: older Triton (3.6) leaves their atomic adds in `scratch`
            scratch.zero_()
            _hsic_kernel_tuned[grid](*args, PRECISION="tf32x3")
        block = _hsic_kernel_tuned.best_config.kwargs["BLOCK_L"]
    _mirror_upper_blocks(scratch, block)
    out += scratch
    return out


def _mirror_upper_blocks(g: torch.Tensor, block: int) -> None:
    """Copy the computed upper block triangle (tile i <= tile j) onto the missing lower tiles, in place."""
    idx = torch.arange(g.shape[0], device=g.device)
    tile = idx // block
    lower = tile[:, None] > tile[None, :]
    g[lower] = g.T[lower]


def hsic_accumulate_ref(f: torch.Tensor) -> torch.Tensor:
    """float64 reference of :func:`hsic_accumulate` (without the accumulation into ``out``)."""
    f64 = f.detach().to(torch.float64)
    return f64 @ f64.T
