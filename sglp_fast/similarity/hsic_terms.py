"""One batch's L×L HSIC estimates from its Gram statistics: the formula, and its float64 per-pair spec.

For L layers of one batch of n tokens, with K̃_l the Gram of layer l with its diagonal set to 0,

    G_ij = Σ_ab K̃_i[a, b] K̃_j[a, b]     (L×L)        D_l = diag(K_l)   (L×n, the zeroed diagonal)
    R_l  = K̃_l 1                        (L×n)        s_l = 1ᵀ R_l      (L)

the estimators of every pair at once are

    unbiased (Song et al. 2012, n >= 4):
        H = (G + s sᵀ / ((n-1)(n-2)) - 2/(n-2) · R Rᵀ) / (n(n-3))
    biased (tr(K H L H)/(n-1)², H = I - 11ᵀ/n, n >= 2), from the full Grams K = K̃ + diag(D):
        Gf = G + D Dᵀ,  Rf = R + D,  sf = Rf 1:   H = (Gf - 2/n · Rf Rfᵀ + sf sfᵀ / n²) / (n-1)²

``hsic_terms`` evaluates these with three small GEMMs in float64 and returns the symmetric part (G is
symmetric in exact arithmetic; fp32 accumulation can leave it off by an ulp). ``hsic_terms_ref`` is the spec:
the same formulas written out pair by pair, in float64, with no vectorization to get wrong.
"""
from __future__ import annotations

import numpy as np

ESTIMATORS = ("unbiased", "biased")
MIN_TOKENS = {"unbiased": 4, "biased": 2}


def _check(g, diags, rowsums, n: int, estimator: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator: expected one of {ESTIMATORS}, got {estimator!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < MIN_TOKENS[estimator]:
        raise ValueError(f"n: the {estimator} estimator needs n >= {MIN_TOKENS[estimator]} tokens, got {n!r}")
    g, d, r = (np.asarray(_numpy(a), dtype=np.float64) for a in (g, diags, rowsums))
    num_layers = g.shape[0] if g.ndim == 2 else -1
    if g.shape != (num_layers, num_layers) or d.shape != (num_layers, n) or r.shape != (num_layers, n):
        raise ValueError(f"g/diags/rowsums: expected shapes (L, L), (L, n), (L, n) with n={n}, got "
                         f"{g.shape}, {d.shape}, {r.shape}")
    return g, d, r


def _numpy(a):
    if hasattr(a, "detach"):  # a torch tensor, on any device
        return a.detach().double().cpu().numpy()
    return a


def hsic_terms(g, diags, rowsums, n: int, estimator: str = "unbiased") -> np.ndarray:
    """L×L float64 HSIC estimates of one batch from G (L×L), the Grams' diagonals D and K̃ row sums R (L×n).

    Inputs may be numpy arrays or torch tensors (any device/dtype; computed in float64).
    """
    g, d, r = _check(g, diags, rowsums, n, estimator)
    if estimator == "unbiased":
        s = r.sum(1)
        h = (g + np.outer(s, s) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (r @ r.T)) / (n * (n - 3))
    else:
        gf = g + d @ d.T
        rf = r + d
        sf = rf.sum(1)
        h = (gf - 2.0 / n * (rf @ rf.T) + np.outer(sf, sf) / (n * n)) / ((n - 1) ** 2)
    return 0.5 * (h + h.T)


def hsic_terms_ref(g, diags, rowsums, n: int, estimator: str = "unbiased") -> np.ndarray:
    """float64 spec of :func:`hsic_terms`: each pair (i, j) from the scalar formulas, one at a time."""
    g, d, r = _check(g, diags, rowsums, n, estimator)
    num_layers = g.shape[0]
    h = np.zeros((num_layers, num_layers))
    for i in range(num_layers):
        for j in range(num_layers):
            gij = 0.5 * (g[i, j] + g[j, i])
            if estimator == "unbiased":
                si, sj = float(np.sum(r[i])), float(np.sum(r[j]))
                rr = float(np.dot(r[i], r[j]))
                h[i, j] = (gij + si * sj / ((n - 1) * (n - 2)) - 2.0 * rr / (n - 2)) / (n * (n - 3))
            else:
                rfi, rfj = r[i] + d[i], r[j] + d[j]
                gf = gij + float(np.dot(d[i], d[j]))
                sfi, sfj = float(np.sum(rfi)), float(np.sum(rfj))
                h[i, j] = (gf - 2.0 / n * float(np.dot(rfi, rfj)) + sfi * sfj / (n * n)) / ((n - 1) ** 2)
    return h
