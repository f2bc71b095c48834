"""Fused Gram row panel: K[P, :] = X[P] Xᵀ with diagonal zeroing, diagonal and row sums in one pass.

For a layer's token matrix X (n×d) and a row panel P = [row_start, row_start + rows), the kernel writes

    K̃[p, b] = Σ_k X[P+p, k] · X[b, k]        with K̃[p, P+p] = 0 when ``zero_diag``  (rows × n, fp32)
    diag[p]  = K[P+p, P+p] = ‖x_{P+p}‖²                                            (rows, fp32)
    r[p]     = Σ_b K̃[p, b]                                                         (rows, fp32)

reading X in bf16/fp16/fp32 and accumulating in fp32 (``tl.dot``; fp32 inputs use tf32x3, not tf32,
so fp32 results stay within 1e-5 of float64). The unbiased HSIC needs exactly these three things
(K̃, its row sums, and the diagonal for the biased estimator and the RBF distances), so one pass over X
replaces the three passes (matmul, fill_diagonal_, sum) the torch backend does.

Design trade-off: the panel is a full row block (rows × n), not a symmetric triangle. Computing both
triangles doubles the Gram FLOPs but keeps every K̃ row complete inside one panel, so the row sums and the
stacked HSIC products (kernels/hsic.py) stream panel by panel without a second pass or atomics. Row sums
are written as one partial per column tile (``[n_col_tiles, rows]``) and reduced by the launcher in a fixed
order: no atomics, so a given config gives the same bits every run. The launcher picks the config first
(interpreter: one small config; small problems: one fixed config; else the autotuner, whose pick is cached
per shape and, where Triton supports it, on disk), then launches once.
"""
from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl

# Autotuned on CUDA; under TRITON_INTERPRET=1 (CPU CI) a single small config keeps the interpreter fast.
GRAM_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 32}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
]
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16}
# below this many multiply-adds per layer a fixed config is used: tuning would cost more than it saves
SMALL_PROBLEM = 1 << 27
SMALL_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3)


def autotune_options() -> dict:
    """Extra ``triton.autotune`` options: cache the pick on disk where supported (Triton >= 3.3), so a new
    process reuses the config (and so the summation order, i.e. the bits) of the last one."""
    return {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


@triton.jit
def _gram_kernel(
    X_ptr, K_ptr, D_ptr, RS_ptr,
    n, d, row_start, rows,
    stride_xl, stride_xm, stride_xk, stride_kl, stride_km, stride_kn, stride_dl, stride_rl, stride_rt,
    ZERO_DIAG: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, WIDE_INDEX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_l = tl.program_id(2).to(tl.int64)  # layer of a stacked [L, n, d] input: one launch for all
    X_ptr += pid_l * stride_xl
    K_ptr += pid_l * stride_kl
    D_ptr += pid_l * stride_dl
    RS_ptr += pid_l * stride_rl
    offs_p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # panel-local row
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # global column (= row of X)
    if WIDE_INDEX:  # element offsets reach 2³¹ (e.g. a 65536-token Gram): 64-bit index math
        offs_p = offs_p.to(tl.int64)
        offs_c = offs_c.to(tl.int64)
    offs_r = row_start + offs_p  # global row of X
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_p < rows
    col_ok = offs_c < n

    a_ptrs = X_ptr + offs_r[:, None] * stride_xm + offs_k[None, :] * stride_xk
    b_ptrs = X_ptr + offs_c[None, :] * stride_xm + offs_k[:, None] * stride_xk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        k_ok = (k0 + offs_k) < d
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:  # exact (bf16/fp16 -> fp32); the interpreter's tl.dot mis-reads 16-bit floats
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_xk
        b_ptrs += BLOCK_K * stride_xk

    is_diag = offs_r[:, None] == offs_c[None, :]
    diag_here = tl.sum(tl.where(is_diag, acc, 0.0), axis=1)
    has_diag = row_ok & (offs_r >= pid_n * BLOCK_N) & (offs_r < pid_n * BLOCK_N + BLOCK_N)
    tl.store(D_ptr + offs_p, diag_here, mask=has_diag)
    if ZERO_DIAG:
        acc = tl.where(is_diag, 0.0, acc)
    tl.store(
        K_ptr + offs_p[:, None] * stride_km + offs_c[None, :] * stride_kn,
        acc,
        mask=row_ok[:, None] & col_ok[None, :],
    )
    # masked loads gave 0 outside the matrix, so padded columns add nothing to the row sums
    tl.store(RS_ptr + pid_n * stride_rt + offs_p, tl.sum(acc, axis=1), mask=row_ok)


_gram_kernel_tuned = triton.autotune(configs=GRAM_CONFIGS, key=["n", "d", "rows"],
                                     **autotune_options())(_gram_kernel)

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def interpreter_active() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``, how CI exercises kernels)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_triton_device(t: torch.Tensor, argument: str) -> None:
    """Triton kernels run on CUDA tensors, or on CPU tensors only inside the interpreter."""
    if t.device.type == "cuda" or (t.device.type == "cpu" and interpreter_active()):
        return
    raise ValueError(
        f"{argument}: the Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors), got a "
        f"tensor on {t.device}; move it to a GPU or use backend='torch'"
    )


def gram_panel(
    x: torch.Tensor,
    row_start: int = 0,
    rows: int | None = None,
    *,
    zero_diag: bool = True,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (K̃ panel [rows, n] fp32, diag [rows] fp32, row sums [rows] fp32) of X = ``x`` (n×d).

    ``x`` may also be a stack [L, n, d] (then every output gains a leading L): one launch for all layers.
    ``out`` may be a caller-owned fp32 [rows, n] (or [L, rows, n]) buffer, any strides, to write into.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor of shape [n, d] or [L, n, d], got {type(x).__name__}")
    if x.ndim not in (2, 3):
        raise ValueError("x: expected a 2-D [n, d] (or stacked [L, n, d]) tensor, got shape "
                         f"{tuple(x.shape)}; "
                         "flatten tokens first")
    if x.dtype not in _SUPPORTED:
        raise TypeError(f"x: expected dtype float32/float16/bfloat16, got {x.dtype}; cast it with x.float()")
    check_triton_device(x, "x")
    stacked = x.ndim == 3
    x3 = x if stacked else x.unsqueeze(0)
    num_layers, n, d = x3.shape
    if n == 0 or d == 0 or num_layers == 0:
        raise ValueError(f"x: expected n >= 1 tokens and d >= 1 features, got shape {tuple(x.shape)}")
    rows = n - row_start if rows is None else rows
    if not (0 <= row_start < n and 1 <= rows <= n - row_start):
        raise ValueError(
            f"row_start/rows: the panel [{row_start}, {row_start + rows}) must lie inside [0, {n}); "
            "pass row_start in [0, n) and 1 <= rows <= n - row_start"
        )
    want = (num_layers, rows, n) if stacked else (rows, n)
    if out is None:
        out = torch.empty(want, device=x.device, dtype=torch.float32)
    elif tuple(out.shape) != want or out.dtype != torch.float32 or out.device != x.device:
        raise ValueError(
            f"out: expected a float32 tensor of shape {want} on {x.device}, got "
            f"{out.dtype} {tuple(out.shape)} on {out.device}; pass out=None to allocate one"
        )
    out3 = out if stacked else out.unsqueeze(0)
    diag = torch.empty((num_layers, rows), device=x.device, dtype=torch.float32)
    # fp32 inputs: three tf32 products per fp32 product (~fp32 accuracy, ~3x the FMA rate); bf16/fp16
    # products are exact in fp32 whatever this says
    precision = "tf32x3" if x.dtype == torch.float32 else "tf32"
    # 32-bit index math inside a layer unless the offsets need 64 bits (64-bit index math was slower)
    span = max(n * abs(x3.stride(1)) + d * abs(x3.stride(2)),
               rows * abs(out3.stride(1)) + n * abs(out3.stride(2)))
    wide = span >= 2**31 - 1
    strides = (x3.stride(0), x3.stride(1), x3.stride(2), out3.stride(0), out3.stride(1), out3.stride(2),
               diag.stride(0))
    # choose the config, then launch once
    if interpreter_active() or x.device.type != "cuda":
        # the interpreter computes 16-bit dots wrongly (Triton 3.9); upcasting in-register is exact and
        # gives the numbers the tensor cores give (bf16/fp16 products are exact in fp32)
        kernel, cfg, launch = _gram_kernel, INTERPRETER_CONFIG, {}
        precision, upcast = "ieee", x.dtype != torch.float32
    elif rows * n * d < SMALL_PROBLEM:
        kernel, cfg = _gram_kernel, SMALL_CONFIG.kwargs
        launch = {"num_warps": SMALL_CONFIG.num_warps, "num_stages": SMALL_CONFIG.num_stages}
        upcast = False
    else:  # the autotuner picks BLOCK_*: size the row-sum partials for the narrowest column tile
        kernel, cfg, launch, upcast = _gram_kernel_tuned, {}, {}, False
    max_tiles = triton.cdiv(n, cfg["BLOCK_N"] if cfg else min(c.kwargs["BLOCK_N"] for c in GRAM_CONFIGS))
    partial = torch.empty((num_layers, max_tiles, rows), device=x.device, dtype=torch.float32)

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]), num_layers)

    kernel[grid](
        x3, out3, diag, partial, n, d, row_start, rows, *strides, partial.stride(0), partial.stride(1),
        ZERO_DIAG=zero_diag, PRECISION=precision, UPCAST=upcast, WIDE_INDEX=wide, **cfg, **launch,
    )
    # only the chosen config's column tiles hold this call's partials (tuning runs of narrower configs may
    # have written more slots): reduce exactly those, in a fixed order
    block_n = cfg["BLOCK_N"] if cfg else kernel.best_config.kwargs["BLOCK_N"]
    partial = partial[:, : triton.cdiv(n, block_n)]
    rowsum = partial.sum(1)
    if not stacked:
        return out, diag[0], rowsum[0]
    return out, diag, rowsum


def gram_panel_ref(
    x: torch.Tensor, row_start: int = 0, rows: int | None = None, *, zero_diag: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 reference of :func:`gram_panel` (the spec)."""
    if x.ndim == 3:
        parts = [gram_panel_ref(layer, row_start, rows, zero_diag=zero_diag) for layer in x]
        return tuple(torch.stack(p) for p in zip(*parts))
    x64 = x.detach().to(torch.float64)
    n = x64.shape[0]
    rows = n - row_start if rows is None else rows
    k = x64[row_start : row_start + rows] @ x64.T
    idx = torch.arange(rows, device=x.device)
    diag = k[idx, row_start + idx].clone()
    if zero_diag:
        k[idx, row_start + idx] = 0.0
    return k, diag, k.sum(1)
