"""Stacked HSIC products: G += F Fᵀ over a stack of layers, accumulated panel by panel, deterministically.

For L layers and one row panel P of their centered, diagonal-zeroed Grams, F is the L×m matrix whose row l
is the flattened panel K̃_l[P, :] (m = |P|·n). The unbiased HSIC of every layer pair needs

    G_ij = Σ_ab K̃_i[a, b] K̃_j[a, b] = Σ_P (F_P F_Pᵀ)_ij

(plus R Rᵀ and s sᵀ from the row sums, which use this same kernel with F = R, m = n). Summing over panels
means no layer's full n×n Gram has to exist at once: peak memory is the L×|P|×n panel stack.

The kernel is a split-K GEMM with a tiny output (L×L) and a huge reduction (m up to ~10⁷): program
(i, j, c) owns the (BLOCK_L × BLOCK_L) output tile (i, j) and the c-th contiguous CHUNK of the reduction,
accumulates it in fp32 registers with fp32-accurate products (compiled: "tf32x3", three tf32 tensor-core
products per fp32 product, error ~1e-7 relative, several times the fp32 FMA rate; plain tf32 would lose
1e-5 accuracy; interpreter: IEEE fp32), and stores its partial tile into slot c of a scratch buffer
[num_chunks, L, L]. Only tiles with i <= j run; each also stores its transpose at (j, i), so every slot is
complete and symmetric off the diagonal tiles. The launcher then sums the slots over the chunk axis (a torch
reduction in a fixed order) and adds the sum into the caller-owned fp32 output.

Design trade-off: atomic adds into one L×L buffer would need no scratch, but their order varies run to run,
so fp32 results would differ in the last bits between identical runs. The scratch costs
num_chunks·L²·4 bytes = (L/CHUNK) × the bytes of F (a few % of the panel the caller already holds, since
CHUNK >= 4096 when compiled) and one extra small reduction; in exchange a given config gives the same bits
every run. (The config itself comes from the autotuner, whose pick is cached per shape and, where Triton
supports it, on disk across processes.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gram import autotune_options, check_triton_device, interpreter_active

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
    F_ptr, P_ptr,
    num_layers, m,
    stride_fl, stride_fm, stride_pc, stride_pi, stride_pj,
    PRECISION: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr,
):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_k = tl.program_id(2)
    if pid_i <= pid_j:  # upper block triangle only; each program also writes its mirror tile
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
        P_ptr += pid_k.to(tl.int64) * stride_pc  # this chunk's slot: a plain store, no atomics
        ok = i_ok[:, None] & j_ok[None, :]
        tl.store(P_ptr + offs_i[:, None] * stride_pi + offs_j[None, :] * stride_pj, acc, mask=ok)
        if pid_i < pid_j:  # the mirror tile (j, i) = acc transposed, by swapping the output strides
            tl.store(P_ptr + offs_i[:, None] * stride_pj + offs_j[None, :] * stride_pi, acc, mask=ok)


_hsic_kernel_tuned = triton.autotune(configs=HSIC_CONFIGS, key=["num_layers", "m"],
                                     **autotune_options())(_hsic_kernel)


def hsic_accumulate(f: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Add F Fᵀ (fp32) into ``out`` ([L, L] float32, caller-owned) and return it; F is [L, m] float32.

    Deterministic: the same inputs and config give the same bits every call (no atomics).
    """
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
    # choose the config, then launch once
    if interpreter_active() or f.device.type != "cuda":
        kernel, cfg, launch, precision = _hsic_kernel, INTERPRETER_CONFIG, {}, "ieee"
    elif num_layers * m < SMALL_PROBLEM:
        kernel, cfg, precision = _hsic_kernel, SMALL_CONFIG.kwargs, "tf32x3"
        launch = {"num_warps": SMALL_CONFIG.num_warps, "num_stages": SMALL_CONFIG.num_stages}
    else:  # the autotuner picks CHUNK: room for the most chunks any config makes
        kernel, cfg, launch, precision = _hsic_kernel_tuned, {}, {}, "tf32x3"
    max_chunks = triton.cdiv(m, cfg["CHUNK"] if cfg else min(c.kwargs["CHUNK"] for c in HSIC_CONFIGS))
    partial = torch.empty((max_chunks, num_layers, num_layers), device=f.device, dtype=torch.float32)

    def grid(meta):
        tiles = triton.cdiv(num_layers, meta["BLOCK_L"])
        return (tiles, tiles, triton.cdiv(m, meta["CHUNK"]))

    kernel[grid](
        f, partial, num_layers, m, f.stride(0), f.stride(1), partial.stride(0), partial.stride(1),
        partial.stride(2), PRECISION=precision, **cfg, **launch,
    )
    # only the chosen config's chunks hold this call's partials (tuning runs of smaller-CHUNK configs may
    # have written more slots): reduce exactly those, over the chunk axis, in a fixed order
    chunk = cfg["CHUNK"] if cfg else kernel.best_config.kwargs["CHUNK"]
    out += partial[: triton.cdiv(m, chunk)].sum(0)
    return out


def hsic_accumulate_ref(f: torch.Tensor) -> torch.Tensor:
    """float64 reference of :func:`hsic_accumulate` (without the accumulation into ``out``)."""
    f64 = f.detach().to(torch.float64)
    return f64 @ f64.T
