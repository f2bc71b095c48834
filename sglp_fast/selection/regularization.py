"""How strongly each compensation map is regularized, chosen by the data (k-fold cross-validation).

Why: a d x d map fitted on a few thousand tokens overfits (d = 576: 332k numbers; d = 8192: 67M), and a map
that overfits the calibration text harms other text. A fixed ridge strength cannot be right for every run,
model and amount of data, so each run's map is chosen on held-out folds from its statistics alone
(``run_statistics.py``), with no extra forward:

    D(a) = (G_-f + a s I)^-1 C_-f,  s = tr(G_-f)/d        the ridge map fitted without fold f
    T    = I + b D(a)                                      shrunk towards the identity (no map) by b in [0, 1]

For each a on a log grid the held-out error reduction over the folds is  2 b A - b² B  with
A = Σ_f tr(D_-fᵀ C_f) and B = Σ_f tr(D_-fᵀ G_f D_-f), so the best shrinkage is b = clip(A / B, 0, 1) in
closed form. The pair (a, b) with the largest held-out reduction wins. Because (a, b) are themselves chosen
on those folds, a map of pure noise would show a small positive gain; so the choice is judged nested (each
fold scores the (a, b) the other folds chose) and when that honest gain is not positive the run gets no
map at all (never worse than no map, on held-out tokens). ``MapChoice.cv_gain`` is that honest gain. One eigendecomposition
of G_-f per fold makes the whole path O(d²) per grid point.

Policies: ``CV`` (the default: ridge path + shrinkage chosen by cross-validation, then halved towards the
identity for text unlike the calibration text: ``scale``; rows unweighted since round 8), ``CV_WEIGHTED``
(rounds 4-7's default: the same with rows weighted by 1 / ||target||), ``FIXED`` (the wave-1 rule: a = 1,
b = 1, weighted, kept for the ablation), ``REPLACEME`` (the peer: a = 0, b = 1, unweighted rows, as in
ReplaceMe, arXiv 2505.02819).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from .run_statistics import RunStatistics

RIDGE_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)


@dataclasses.dataclass(frozen=True)
class MapPolicy:
    """How a run's map is regularized: ``alphas`` searched by CV (or one fixed value), shrinkage, row weights."""

    name: str
    alphas: tuple[float, ...]
    shrink: bool
    weighted: bool
    cross_validated: bool
    scale: float = 1.0  # a further shrink of every map towards the identity (T = I + scale * shrink * D)

    def __post_init__(self) -> None:
        if not self.alphas or any(not a >= 0 for a in self.alphas):
            raise ValueError(f"map policy {self.name!r}: expected non-negative ridge strengths, got {self.alphas}")


# scale 0.5: chosen on the selection domain (software-documentation prose, benchmarks/domains.py "readme"):
# the folds tune the shrinkage to the calibration text, and on other text half of that map did better on
# every plan tried (docs/quality.md, round 4); the check loss on calibration windows cannot see this
# rows unweighted (round 8): the 1 / ||target|| row weights (round 4, so that the few massive-activation tokens
# would not dominate a fit on the calibration text alone) cost up to 14% held-out perplexity on the selection
# domain once the maps also fit on the model's own samples (round 7): docs/quality.md, round 8
CV = MapPolicy("cv", RIDGE_GRID, shrink=True, weighted=False, cross_validated=True, scale=0.5)
CV_WEIGHTED = dataclasses.replace(CV, name="cv-weighted", weighted=True)
FIXED = MapPolicy("fixed", (1.0,), shrink=False, weighted=True, cross_validated=False)
REPLACEME = MapPolicy("replaceme", (0.0,), shrink=False, weighted=False, cross_validated=False)
POLICIES = {p.name: p for p in (CV, CV_WEIGHTED, FIXED, REPLACEME)}


def get_policy(name: str | MapPolicy) -> MapPolicy:
    if isinstance(name, MapPolicy):
        return name
    if name not in POLICIES:
        raise ValueError(f"compensation: expected one of {sorted(POLICIES)}, got {name!r}")
    return POLICIES[name]


@dataclasses.dataclass(frozen=True)
class MapChoice:
    """A run's regularization: ridge strength ``alpha`` (x tr(G)/d), shrinkage ``shrink``; None = no map."""

    alpha: float | None
    shrink: float
    cv_gain: float | None  # nested held-out error reduction, a fraction of the error without a map (None: no CV)
    path: tuple[tuple[float, float, float], ...] = ()  # (alpha, best shrink, gain) for every alpha tried

    @property
    def has_map(self) -> bool:
        return self.alpha is not None and self.shrink > 0

    def to_dict(self) -> dict:
        return {"alpha": self.alpha, "shrink": round(self.shrink, 6),
                "cv_gain": None if self.cv_gain is None else round(self.cv_gain, 6)}


@dataclasses.dataclass
class FoldSolution:
    """G without one fold as V diag(evals) Vᵀ, and Ap = Vᵀ C: every ridge map of that fold is V diag(g) Ap.

    Why keep it: the cross-validation decomposes each fold's G to score the whole ridge path; the fold's map
    for the alpha it picks then costs one matrix product instead of another eigendecomposition (at d = 8192
    an eigendecomposition is minutes on a few CPU cores)."""

    fold: int
    evals: torch.Tensor
    V: torch.Tensor
    Ap: torch.Tensor


def choose(stats: RunStatistics, policy: MapPolicy, folds: Sequence[int]) -> MapChoice:
    """The policy's regularization for one run; ``folds``: the held-out folds to cross-validate over."""
    return choose_with_solutions(stats, policy, folds)[0]


def choose_with_solutions(stats: RunStatistics, policy: MapPolicy, folds: Sequence[int],
                          keep: Callable[[torch.Tensor], torch.Tensor] | None = None,
                          device: torch.device | str | None = None) -> tuple[MapChoice, dict[int, FoldSolution]]:
    """``choose``, and with ``keep`` (where to hold d x d matrices, e.g. ``MatrixStore.keep``) each
    cross-validated fold's decomposition, for ``fit(..., solution=)``; {} without ``keep`` or CV.
    ``device``: where the solve runs (the compute device: a GPU decomposes d = 8192 in seconds, two CPU
    cores take minutes); the statistics stay on the host, the solutions go back to it."""
    if not policy.cross_validated:
        return MapChoice(alpha=policy.alphas[0], shrink=policy.scale, cv_gain=None), {}
    traces = [float(g.diagonal().sum()) for g in stats.gram]  # tr(G) per slot, without summing d x d slots
    usable = [f for f in folds if float(stats.tokens[f]) > 0 and sum(traces) - traces[f] > 0]
    if not usable:
        raise ValueError("compensate: no held-out fold with tokens to choose the regularization on; use more "
                         "calibration windows")
    solutions: dict[int, FoldSolution] = {}
    terms = []  # (A_f, B_f) per fold, every alpha
    for f in usable:
        a, b, solution = _fold_terms(stats, f, policy.alphas, keep, device)
        terms.append((a, b))
        if solution is not None:
            solutions[f] = solution
    energy = [float(stats.energy[f]) for f in usable]
    i, shrink, gain, path = _best(terms, energy, policy)
    if len(usable) > 1:  # the choice itself judged on folds it did not see (nested): its honest gain
        honest = 0.0
        for k, (a, b) in enumerate(terms):
            j, beta, _, _ = _best(terms[:k] + terms[k + 1:], energy[:k] + energy[k + 1:], policy)
            honest += 2 * beta * float(a[j]) - beta * beta * float(b[j])
        honest /= max(sum(energy), 1e-300)
    else:
        honest = gain
    if not (gain > 0 and honest > 0):
        return MapChoice(alpha=None, shrink=0.0, cv_gain=honest, path=path), solutions
    return MapChoice(alpha=policy.alphas[i], shrink=policy.scale * shrink, cv_gain=honest, path=path), solutions


def _best(terms, energy, policy: MapPolicy):
    """(alpha index, shrink, gain, path) maximizing the held-out error reduction summed over ``terms``."""
    A, B = sum(t[0] for t in terms), sum(t[1] for t in terms)
    path = []
    for alpha, a, b in zip(policy.alphas, A.tolist(), B.tolist()):
        shrink = min(max(a / b, 0.0), 1.0) if (policy.shrink and b > 0) else 1.0
        gain = (2 * shrink * a - shrink * shrink * b) / max(sum(energy), 1e-300)
        path.append((float(alpha), float(shrink), float(gain)))
    i = max(range(len(path)), key=lambda j: (path[j][2], path[j][0]))  # ties: the stronger ridge
    return i, path[i][1], path[i][2], tuple(path)


def _fold_terms(stats: RunStatistics, fold: int, alphas: Sequence[float],
                keep: Callable[[torch.Tensor], torch.Tensor] | None = None,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor, FoldSolution | None]:
    """(A_f, B_f) of every alpha: tr(Dᵀ C_f) and tr(Dᵀ G_f D) for D fitted without fold ``fold``; with
    ``keep``, the fold's decomposition too. At most about five d x d float64 temporaries at once, on
    ``device`` (None: where the statistics are)."""
    G, C = stats.without(fold, device)
    d = G.shape[0]
    evals, V = torch.linalg.eigh(G)
    del G
    Ap = V.T @ C                      # D = V diag(g) Ap
    del C
    r = (Ap * (V.T @ _on(stats.cross[fold], device))).sum(1)  # tr(Dᵀ C_f) = Σ_i g_i r_i
    P = V.T @ _on(stats.gram[fold], device) @ V
    P.mul_(Ap @ Ap.T)                 # tr(Dᵀ G_f D) = gᵀ P g
    scale = float(evals.clamp_min(0).sum()) / d
    a_out, b_out = [], []
    for alpha in alphas:
        g = _inverse(evals, alpha * scale)
        a_out.append(float(g @ r))
        b_out.append(float(g @ P @ g))
    del P
    solution = None if keep is None else FoldSolution(fold, evals.cpu(), keep(V), keep(Ap))
    return (torch.tensor(a_out, dtype=torch.float64), torch.tensor(b_out, dtype=torch.float64), solution)


def _inverse(evals: torch.Tensor, lam: float) -> torch.Tensor:
    """1 / (evals + lam); with lam = 0 a pseudo-inverse (directions the data never spans get no update)."""
    if lam > 0:
        return 1.0 / (evals.clamp_min(0) + lam)
    tol = float(evals.abs().max()) * evals.shape[0] * torch.finfo(torch.float64).eps
    return torch.where(evals > tol, 1.0 / evals.clamp_min(tol), torch.zeros_like(evals))


def _on(x: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    return x if device is None else x.to(device)


def fit(stats: RunStatistics, choice: MapChoice, without_fold: int | None = None,
        solution: FoldSolution | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """T = I + shrink * D(alpha), fitted on every slot but ``without_fold`` (float64, returned on the CPU).
    ``solution``: that fold's decomposition from ``choose_with_solutions`` (the same numbers, no
    eigendecomposition). ``device``: where the solve runs (None: where the statistics are)."""
    if solution is not None and solution.fold != without_fold:
        raise ValueError(f"fit: a decomposition of fold {solution.fold} cannot fit the map without fold "
                         f"{without_fold}")
    d = stats.gram.shape[-1]
    if not choice.has_map:
        return torch.eye(d, dtype=torch.float64)
    if solution is None:
        G, C = stats.without(without_fold, device)
        evals, V = torch.linalg.eigh(G)
        del G
        Ap = V.T @ C
        del C
    else:
        evals, V, Ap = (_on(x, device) for x in (solution.evals, solution.V, solution.Ap))
    g = _inverse(evals, float(choice.alpha) * float(evals.clamp_min(0).sum()) / d)
    T = V @ (g[:, None] * Ap)
    T.mul_(choice.shrink)
    T.diagonal().add_(1.0)
    return T.cpu()
