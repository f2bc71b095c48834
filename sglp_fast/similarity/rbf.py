"""RBF kernels from linear Grams: the median-heuristic bandwidth and the in-place conversion.

k(a, b) = exp(-‖xa - xb‖² / (2σ²)), with the squared distances taken from the linear Gram K = X Xᵀ that the
linear path computes anyway: ‖xa - xb‖² = Kaa + Kbb - 2Kab (clamped at 0 against rounding).

Bandwidth (median heuristic), per layer and per batch: σ² = the lower median of the off-diagonal squared
distances {‖xa - xb‖² : a < b}, i.e. the ⌈m/2⌉-th smallest of the m = n(n-1)/2 values. It needs the layer's
whole distance matrix, so the RBF path forms each layer's full n×n Gram once (never panel by panel).

Shift: RBF kernels have a large positive mean (every entry is in (0, 1]), which would cancel in the fp32 row
sums and products. Both HSIC estimators ignore adding a constant to every kernel entry (the unbiased one
exactly, the biased one through its centering), so the kernel is stored minus its mean off-diagonal value
``shift``; its diagonal, 1 before the shift, becomes 1 - shift (and is zeroed in K̃ like the linear path).

``rbf_kernel_ref`` is the float64 spec (distances from the coordinates, sorted-pairs median, no shift).
"""
from __future__ import annotations

import numpy as np
import torch


def rbf_sigma2(sqdist: torch.Tensor) -> torch.Tensor:
    """Median-heuristic bandwidth: lower median of the off-diagonal entries of a symmetric n×n distance²."""
    n = sqdist.shape[0]
    if n < 2:
        raise ValueError(f"sqdist: the median heuristic needs n >= 2 points, got n={n}")
    m = n * (n - 1) // 2
    work = sqdist.clone()
    work.fill_diagonal_(float("inf"))
    # every unordered pair appears twice off the diagonal: the k-th smallest of the doubled list is
    # the ((k+1)//2)-th smallest pair; we want pair index (m-1)//2 (0-based), i.e. doubled index 2·that.
    k = 2 * ((m - 1) // 2) + 1
    return torch.kthvalue(work.flatten(), k).values


def rbf_from_linear_(k: torch.Tensor, sq_rows: torch.Tensor, sq_all: torch.Tensor, start: int,
                     sigma2: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """In place: linear Gram rows [start, start + rows) -> RBF rows minus ``shift``, diagonal zeroed.

    ``sq_rows``/``sq_all``: squared norms of the panel's rows / of all n rows. Returns the row sums.
    """
    k.mul_(-2.0).add_(sq_rows[:, None]).add_(sq_all[None, :]).clamp_(min=0.0)
    k.mul_(-0.5 / sigma2).exp_().sub_(shift)
    k.diagonal(offset=start).zero_()
    return k.sum(1)


def rbf_gram_from_linear_(k: torch.Tensor, sq: torch.Tensor, where: str = "x"):
    """In place: a full linear Gram (n×n, diagonal ``sq`` intact) -> shifted RBF K̃ with diagonal 0.

    Returns (row sums, diagonal before zeroing (1 - shift), sigma2, shift). Raises ValueError naming
    ``where`` when the median distance is 0 (bandwidth undefined).
    """
    n = k.shape[0]
    k.mul_(-2.0).add_(sq[:, None]).add_(sq[None, :]).clamp_(min=0.0).fill_diagonal_(0.0)
    sigma2 = rbf_sigma2(k)
    if not bool(sigma2 > 0):
        raise ValueError(f"{where}: the median pairwise distance is 0 (more than half the tokens "
                         "coincide), so the RBF bandwidth and CKA are undefined; use kernel='linear' or "
                         "more diverse tokens")
    k.mul_(-0.5 / sigma2).exp_()
    shift = (k.sum(dtype=torch.float64) - n) / (n * (n - 1))  # mean off-diagonal kernel value
    shift = shift.to(k.dtype)
    k.sub_(shift).fill_diagonal_(0.0)
    diag = (1.0 - shift).expand(n).clone()
    return k.sum(1), diag, sigma2, shift


def rbf_kernel_ref(x) -> tuple[np.ndarray, float]:
    """float64 spec: the RBF kernel matrix of the rows of ``x`` (n×d) and its median-heuristic σ²."""
    x = np.asarray(x.detach().double().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float64)
    diff = x[:, None, :] - x[None, :, :]
    dist2 = np.einsum("abk,abk->ab", diff, diff)
    pairs = np.sort(dist2[np.triu_indices(len(x), 1)])
    sigma2 = float(pairs[(len(pairs) - 1) // 2])
    return np.exp(-dist2 / (2 * sigma2)), sigma2
