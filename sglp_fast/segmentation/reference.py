"""Fisher optimal segmentation in numpy: the executable spec that the C++ core (csrc/fisher.cpp) mirrors.

Every floating-point operation here happens in the same order as in C++, so both give bit-identical costs,
objectives and breakpoints (tests/test_segment.py checks that). That is why a few reductions are written as
explicit sequential loops/accumulations instead of ``np.sum`` (whose pairwise order C++ would not follow):

1. centre the rows by the mean of all rows (sequential sum over rows, then ``/ L``): prefix sums of centred
   data stay small, which keeps ``Σ‖x‖² − ‖Σx‖²/n`` away from catastrophic cancellation;
2. ``S[t] = x_0 + … + x_{t-1}`` (prefix sums of rows) and ``Q[t] = Σ_{u<t} ‖x_u‖²`` (row norms summed over
   columns in order, then prefix-summed);
3. ``acc(a, b) = Σ_c (S[b,c] − S[a,c])²`` accumulated column by column (c = 0, 1, …);
4. ``D(i, j) = (Q[j+1] − Q[i]) − acc(i, j+1) / n`` with ``n = j − i + 1``; values ≤ 0 (rounding noise only,
   the exact value is ≥ 0) become +0.0 and ``D(i, i) = 0`` exactly.

The DP is ``e(1, j) = D(0, j)``, ``e(k, j) = min_i e(k−1, i−1) + D(i, j)`` over segments of at least
``min_size`` rows; the smallest minimizing ``i`` wins (``np.argmin`` returns the first minimum; C++ uses a
strict ``<`` scan in increasing ``i``). Backtracking from ``j = L−1`` therefore prefers, among optimal
segmentations, the earliest start of the last segment, then of the one before, and so on.
"""
from __future__ import annotations

import numpy as np

__all__ = ["segment_costs", "fisher_dp", "backtrack"]


def segment_costs(profiles: np.ndarray) -> np.ndarray:
    """Return the L×L matrix D(i, j) (upper triangle, i ≤ j; zeros below) for float64 ``profiles`` (L×p).

    O(L²·p) time, O(L²) memory; see the module docstring for the exact operation order.
    """
    x = np.ascontiguousarray(profiles, dtype=np.float64)
    n_rows, n_cols = x.shape
    mean = np.add.accumulate(x, axis=0)[-1] / n_rows  # sequential over rows
    xc = x - mean
    prefix = np.zeros((n_rows + 1, n_cols))
    prefix[1:] = np.add.accumulate(xc, axis=0)  # S[t+1] = S[t] + xc[t], sequential
    row_sq = np.zeros(n_rows)
    xc_t = np.ascontiguousarray(xc.T)
    for c in range(n_cols):  # ‖x_t‖² summed over columns in order
        row_sq += xc_t[c] * xc_t[c]
    sq_prefix = np.zeros(n_rows + 1)
    sq_prefix[1:] = np.add.accumulate(row_sq)
    prefix_t = np.ascontiguousarray(prefix.T)
    acc = np.zeros((n_rows + 1, n_rows + 1))  # acc[a, b] = ‖S[b] − S[a]‖²
    for c in range(n_cols):
        diff = prefix_t[c][None, :] - prefix_t[c][:, None]
        acc += diff * diff
    start = np.arange(n_rows)[:, None]
    end = np.arange(n_rows)[None, :]
    count = (end - start + 1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = (sq_prefix[None, 1:] - sq_prefix[:-1, None]) - acc[:-1, 1:] / count
    cost = np.where((end > start) & (cost > 0.0), cost, 0.0)  # clamp noise (and -0.0) to +0.0
    return cost


def fisher_dp(costs: np.ndarray, k_max: int, min_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Run the DP for k = 1..k_max on an L×L cost matrix (upper triangle used).

    Returns ``(objective_by_k, parent)``: ``objective_by_k[k-1] = e(k, L-1)`` and ``parent[k-1, j]`` = start
    of the last segment of the optimal k-segmentation of rows 0..j (-1 where infeasible).
    """
    d = np.asarray(costs, dtype=np.float64)
    n_rows = d.shape[0]
    start = np.arange(n_rows)[:, None]
    end = np.arange(n_rows)[None, :]
    allowed = start <= end - min_size + 1  # last segment [i, j] holds at least min_size rows
    d_allowed = np.where(allowed, d, np.inf)
    best = np.full((k_max, n_rows), np.inf)
    parent = np.full((k_max, n_rows), -1, dtype=np.int64)
    first_ok = np.arange(n_rows) + 1 >= min_size
    best[0] = np.where(first_ok, d[0], np.inf)
    parent[0, first_ok] = 0
    cols = np.arange(n_rows)
    for k in range(2, k_max + 1):
        prev = np.full(n_rows, np.inf)
        prev[1:] = best[k - 2, :-1]  # prev[i] = e(k-1, i-1)
        with np.errstate(over="ignore"):  # overflow to inf is reported by the caller
            cand = prev[:, None] + d_allowed  # cand[i, j]
        arg = np.argmin(cand, axis=0)  # first minimum = smallest i
        val = cand[arg, cols]
        feasible = cols + 1 >= k * min_size
        best[k - 1] = np.where(feasible, val, np.inf)
        parent[k - 1] = np.where(feasible, arg, -1)
    return best[:, n_rows - 1].copy(), parent


def backtrack(parent: np.ndarray, k: int) -> list[tuple[int, int]]:
    """Walk the parent table back from row L-1 and return the k inclusive segments in order."""
    end = parent.shape[1] - 1
    segments = []
    for kk in range(k, 0, -1):
        begin = int(parent[kk - 1, end])
        if begin < 0 or begin > end:
            raise AssertionError(f"infeasible parent entry at k={kk}, j={end}")  # internal invariant
        segments.append((begin, end))
        end = begin - 1
    if end != -1:
        raise AssertionError("backtracking did not reach row 0")
    return segments[::-1]
