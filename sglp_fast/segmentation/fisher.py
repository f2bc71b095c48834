"""Fisher optimal segmentation of ordered layers into contiguous segments (SGLP stage 2).

``fisher_segment(profiles, k)`` splits rows 0..L-1 of ``profiles`` (for SGLP: the L×L CKA matrix, row t =
layer t's similarity profile) into k contiguous segments minimizing the total within-segment scatter
``Σ_segments Σ_{t∈seg} ‖x_t − mean(seg)‖²`` (Fisher 1958). ``fisher_segment_costs(costs, k)`` runs the same
exact DP on any precomputed segment cost matrix. The work happens in C++ (``sglp_fast._fisher``, GIL
released, threads over segment ends); ``impl="numpy"`` runs the spec in ``reference.py``, which gives
bit-identical results and needs no compiled code.

Choosing k automatically (``k="auto"``): the SGLP paper (arXiv 2410.14720) segments the CKA matrix with
Fisher's method, but the text we could reach states no rule for the number of segments, so we use a
documented knee rule ("kneedle", after Satopää et al. 2011, without smoothing): normalize the curve
``objective_by_k`` for k = 1..k_max to the unit square (k → (k−1)/(k_max−1), objective → (e_k − e_kmax) /
(e_1 − e_kmax)) and pick the k with the largest distance below the chord from (0, 1) to (1, 0), the smallest
such k on ties. Past the true number of blocks the objective only drops by noise, so the curve flattens
there and that point is furthest below the chord. If no point lies below the chord by more than 1e-9 (a
flat curve, e.g. constant profiles, or k_max ≤ 2) there is no knee and k = 1. ``k_max`` defaults to
``min(L // min_size, max(2, 2·⌈√L⌉))``: the knee needs candidates well past it to be visible, and 2·⌈√L⌉
(12 for 30 layers, 18 for 80) covers any sensible number of segments for layer pruning while the DP stays
O(L^2.5).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ..checks import check_int, is_int
from . import reference as _segment_ref

__all__ = ["Segmentation", "fisher_segment", "fisher_segment_costs", "knee_k", "KNEE_RULE"]

KNEE_RULE = "kneedle"
_KNEE_MIN_GAP = 1e-9
_MAX_ABS_VALUE = 1e100  # keeps every scatter sum (≤ L·p·(2·1e100)²) far from float64 overflow
_BUILD_HINT = (
    "the C++ extension sglp_fast._fisher is not built: run `bash scripts/bootstrap.sh` or "
    "`pip install --no-build-isolation -e .` in the repository root, or pass impl='numpy' for the (slower) "
    "numpy implementation"
)


@dataclass(frozen=True)
class Segmentation:
    """Result of a Fisher segmentation.

    segments: inclusive (first, last) row ranges, in order, covering 0..L-1.
    k: number of segments used; objective: their optimal total cost e(k, L-1).
    objective_by_k: optimal objective for k = 1..k_max (index k-1), from the same DP pass.
    k_rule: "given" or the name of the rule that chose k ("kneedle").
    """

    segments: list[tuple[int, int]]
    k: int
    objective: float
    objective_by_k: np.ndarray
    k_rule: str
    k_max: int
    min_size: int
    impl: str
    num_rows: int = field(repr=False)

    @property
    def starts(self) -> list[int]:
        """First row of every segment (``starts[0] == 0``)."""
        return [first for first, _ in self.segments]

    def labels(self) -> np.ndarray:
        """Segment index of every row, shape (L,)."""
        out = np.empty(self.num_rows, dtype=np.int64)
        for idx, (first, last) in enumerate(self.segments):
            out[first : last + 1] = idx
        return out


def fisher_segment(profiles, k: int | Literal["auto"] = "auto", k_max: int | None = None, min_size: int = 1,
                   impl: Literal["cpp", "numpy"] = "cpp", threads: int | None = None) -> Segmentation:
    """Split the rows of ``profiles`` (L×p) into k contiguous segments of minimal total scatter.

    k: number of segments, or "auto" (knee rule, see the module docstring). k_max: largest k for which
    ``objective_by_k`` is computed (default: k, or the auto bound). min_size: minimum rows per segment.
    impl: "cpp" (default, needs the built extension) or "numpy" (the spec). threads: C++ threads
    (None = all cores; results do not depend on it).
    """
    x = _as_matrix(profiles, "profiles")
    if not np.all(np.isfinite(x)):
        bad = tuple(int(v) for v in np.argwhere(~np.isfinite(x))[0])
        raise ValueError(
            f"profiles: expected finite values, got {x[bad]!r} at (row, column) {bad}; replace NaN/inf "
            "(e.g. a CKA of a constant layer) before segmenting"
        )
    peak = float(np.max(np.abs(x)))
    if peak > _MAX_ABS_VALUE:
        raise ValueError(
            f"profiles: expected |values| <= {_MAX_ABS_VALUE:g} (squares must fit in float64), got {peak:g}; "
            "rescale the profiles (the segmentation is scale invariant)"
        )
    return _solve(x, "fisher_dp_profiles", lambda m, k_max, min_size: _segment_ref.fisher_dp(
        _segment_ref.segment_costs(m), k_max, min_size), k, k_max, min_size, impl, threads)


def fisher_segment_costs(costs, k: int | Literal["auto"] = "auto", k_max: int | None = None, min_size: int = 1,
                         impl: Literal["cpp", "numpy"] = "cpp", threads: int | None = None) -> Segmentation:
    """Same DP on a precomputed L×L segment cost matrix: ``costs[i, j]`` = cost of segment i..j (i ≤ j).

    Only the upper triangle (diagonal included) is read; the lower triangle is ignored. Costs need not be
    scatters (any finite additive segment cost works); with non-monotone costs k="auto" may be meaningless.
    """
    d = _as_matrix(costs, "costs")
    if d.shape[0] != d.shape[1]:
        raise ValueError(f"costs: expected a square L×L matrix, got shape {d.shape}; pass D(i, j) for i <= j")
    upper = np.triu(np.ones(d.shape, dtype=bool))
    bad_mask = upper & ~np.isfinite(d)
    if bad_mask.any():
        bad = tuple(int(v) for v in np.argwhere(bad_mask)[0])
        raise ValueError(
            f"costs: expected finite values on and above the diagonal, got {d[bad]!r} at {bad}; "
            "replace NaN/inf segment costs"
        )
    def numpy_dp(m, k_max, min_size):
        objective_by_k, parent = _segment_ref.fisher_dp(np.where(upper, m, 0.0), k_max, min_size)
        if not np.all(np.isfinite(objective_by_k)):
            worst = int(np.argmin(np.isfinite(objective_by_k))) + 1
            raise ValueError(f"costs: the optimal objective overflowed to inf at k = {worst}; rescale the inputs")
        return objective_by_k, parent

    return _solve(d, "fisher_dp_costs", numpy_dp, k, k_max, min_size, impl, threads)


def _solve(matrix: np.ndarray, cpp_name: str, numpy_dp, k, k_max, min_size, impl, threads) -> Segmentation:
    """Check the options, run the DP in C++ (``_fisher.<cpp_name>``) or in the numpy spec, backtrack."""
    num_rows = matrix.shape[0]
    k_int, k_max_int, min_size_int, impl, threads_int = _check_options(k, k_max, min_size, impl, threads, num_rows)
    if impl == "cpp":
        objective_by_k, parent = getattr(_extension(), cpp_name)(matrix, k_max_int, min_size_int, threads_int)
    else:
        objective_by_k, parent = numpy_dp(matrix, k_max_int, min_size_int)
    return _finish(objective_by_k, parent, k_int, k_max_int, min_size_int, impl, num_rows)


def knee_k(objective_by_k) -> int:
    """k chosen by the "kneedle" rule on ``objective_by_k`` (index k-1); see the module docstring."""
    y = np.asarray(objective_by_k, dtype=np.float64)
    if y.ndim != 1 or y.size == 0 or not np.all(np.isfinite(y)):
        raise ValueError(f"objective_by_k: expected a non-empty finite 1-D array, got {y!r}")
    span = y[0] - y[-1]
    if y.size < 3 or not span > 0.0:
        return 1
    x_norm = np.arange(y.size) / (y.size - 1)
    y_norm = (y - y[-1]) / span
    below = (1.0 - x_norm) - y_norm
    best = int(np.argmax(below))  # first maximum = smallest k
    return best + 1 if below[best] > _KNEE_MIN_GAP else 1


# ----------------------------------------------------------------------------------------------- helpers


def _check_options(k, k_max, min_size, impl, threads, num_rows: int):
    """Validate the options both entry points share; returns (k, k_max, min_size, impl, threads)."""
    k_int, k_max_int, min_size_int = _check_k(k, k_max, min_size, num_rows)
    return k_int, k_max_int, min_size_int, _check_impl(impl), _check_threads(threads)


def _extension():
    try:  # imported on first use, so that a missing build fails with the hint (and impl="numpy" still works)
        from .. import _fisher  # noqa: PLC0415
    except ImportError as exc:
        raise ImportError(_BUILD_HINT) from exc
    if not hasattr(_fisher, "fisher_dp_profiles"):  # a stale placeholder build
        raise ImportError(_BUILD_HINT + f" (found an outdated build at {_fisher.__file__})")
    return _fisher


def _as_matrix(value, name: str) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch tensor (any dtype, bf16 too), no torch import
        value = value.detach().cpu()
        value = (value.double() if value.is_floating_point() else value).numpy()
    try:
        arr = np.asarray(value)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(f"{name}: expected a 2-D array of real numbers, got {type(value).__name__}: {exc}") from exc
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(
            f"{name}: expected a 2-D array of real numbers, got dtype {arr.dtype}; convert it with "
            "np.asarray(..., dtype=np.float64)"
        )
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (L rows), got {arr.ndim}-D with shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty array (L >= 1 rows, >= 1 column), got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float64)


def _check_int(value, name: str, minimum: int) -> int:
    """An int >= minimum: TypeError for a non-integer (a float, a bool), ValueError for one out of range."""
    if not is_int(value):
        raise TypeError(f"{name}: expected an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    return check_int(name, int(value), minimum, expected=f"an integer >= {minimum}")


def _check_k(k, k_max, min_size, num_rows: int) -> tuple[int | None, int, int]:
    """Validate (k, k_max, min_size) for L = num_rows; return (k or None for auto, k_max, min_size)."""
    min_size = _check_int(min_size, "min_size", 1)
    if min_size > num_rows:
        raise ValueError(f"min_size: expected <= L = {num_rows} (one segment must fit), got {min_size}")
    largest = num_rows // min_size
    if isinstance(k, str):
        if k != "auto":
            raise ValueError(f"k: expected a positive integer or 'auto', got {k!r}")
        k_int = None
    else:
        k_int = _check_int(k, "k", 1)
        if k_int > num_rows:
            raise ValueError(f"k: expected k <= L = {num_rows} (one row per segment at most), got {k_int}")
        if k_int * min_size > num_rows:
            raise ValueError(
                f"k: k * min_size must be <= L = {num_rows}, got k = {k_int}, min_size = {min_size}; "
                f"use k <= {largest} or a smaller min_size"
            )
    if k_max is None:
        k_max_int = k_int if k_int is not None else min(largest, max(2, 2 * math.ceil(math.sqrt(num_rows))))
    else:
        k_max_int = _check_int(k_max, "k_max", 1)
        if k_int is not None and k_max_int < k_int:
            raise ValueError(f"k_max: expected k_max >= k = {k_int}, got {k_max_int}")
        if k_max_int * min_size > num_rows:
            raise ValueError(
                f"k_max: k_max * min_size must be <= L = {num_rows}, got k_max = {k_max_int}, "
                f"min_size = {min_size}; use k_max <= {largest}"
            )
    return k_int, k_max_int, min_size


def _check_impl(impl) -> str:
    if impl not in ("cpp", "numpy"):
        raise ValueError(f"impl: expected 'cpp' or 'numpy', got {impl!r}")
    return impl


def _check_threads(threads) -> int:
    if threads is None:
        return 0
    return _check_int(threads, "threads", 1)


def _finish(objective_by_k, parent, k, k_max, min_size, impl, num_rows) -> Segmentation:
    objective_by_k = np.asarray(objective_by_k, dtype=np.float64)
    if k is None:
        k, rule = knee_k(objective_by_k), KNEE_RULE
    else:
        rule = "given"
    if impl == "cpp":
        segments = [(int(a), int(b)) for a, b in _extension().backtrack(parent, k)]
    else:
        segments = _segment_ref.backtrack(parent, k)
    return Segmentation(
        segments=segments,
        k=k,
        objective=float(objective_by_k[k - 1]),
        objective_by_k=objective_by_k,
        k_rule=rule,
        k_max=k_max,
        min_size=min_size,
        impl=impl,
        num_rows=num_rows,
    )
