"""Per-block importance scorers behind one interface: higher score = more important = kept longer.

Every scorer reads the one calibration pass (``CalibrationResult``), so computing all of them costs nothing
extra and the plan records them side by side. Within each segment the blocks with the LOWEST score go first.

- ``gradnorm`` (the SGLP paper's): L2 norm of the loss gradient over all of a block's weights.
- ``taylor``: first-order Taylor estimate of the loss change when the block is zeroed, sum |W * dL/dW|.
- ``block_influence`` (ShortGPT): mean over tokens of 1 - cos(h_in, h_out); a block that barely turns the
  hidden state is redundant.
- ``relative_update``: mean over tokens of ||h_out - h_in|| / ||h_in||; a free forward statistic that tracks
  the loss increase of skipping a block far better than GradNorm on SmolLM2 (docs/quality.md).
- ``random``: uniform random scores from ``seed``; the control every method must beat.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Scorer:
    """A named rule that turns the calibration result into one importance value per block."""

    name: str
    needs_gradients: bool
    description: str
    _fn: Callable[[Any, int], np.ndarray]

    def __call__(self, calib_result: Any, seed: int = 0) -> np.ndarray:
        scores = np.asarray(self._fn(calib_result, seed), dtype=np.float64)
        num_blocks = int(calib_result.num_blocks)
        if scores.shape != (num_blocks,):
            raise ValueError(f"scorer {self.name!r}: expected {num_blocks} scores (one per block), "
                             f"got shape {scores.shape}; the calibration result is inconsistent")
        if not np.all(np.isfinite(scores)):
            bad = np.flatnonzero(~np.isfinite(scores)).tolist()
            raise ValueError(f"scorer {self.name!r}: non-finite scores for blocks {bad}; the calibration "
                             "loss overflowed or the gradients were not computed (use dtype float32)")
        return scores


def _field(name: str) -> Callable[[Any, int], np.ndarray]:
    def read(result: Any, seed: int) -> np.ndarray:
        value = getattr(result, name, None)
        if value is None:
            raise ValueError(f"calibration result has no {name!r}; run calibrate(..., gradients=True) "
                             "for gradient-based scorers")
        return np.asarray(value, dtype=np.float64)
    return read


def _random(result: Any, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(int(result.num_blocks))


SCORERS: dict[str, Scorer] = {
    s.name: s for s in (
        Scorer("gradnorm", True, "L2 norm of dLoss/dW over the block's weights (SGLP paper)", _field("grad_norm")),
        Scorer("taylor", True, "sum |W * dLoss/dW| over the block's weights", _field("taylor")),
        Scorer("block_influence", False, "mean 1 - cos(h_in, h_out) over tokens (ShortGPT)",
               _field("block_influence")),
        Scorer("relative_update", False, "mean ||h_out - h_in|| / ||h_in|| over tokens",
               _field("relative_update")),
        Scorer("random", False, "uniform random, seeded (control)", _random),
    )
}


def get_scorer(name: str) -> Scorer:
    if name not in SCORERS:
        raise ValueError(f"scorer: expected one of {sorted(SCORERS)}, got {name!r}")
    return SCORERS[name]


def compute_scores(calib_result: Any, names: Iterable[str] | None = None, seed: int = 0) -> dict[str, list[float]]:
    """Scores of every named scorer (all by default) as plain lists, ready for the JSON plan.

    A gradient scorer is skipped (not faked) when the calibration ran without gradients.
    """
    names = list(SCORERS) if names is None else list(names)
    out: dict[str, list[float]] = {}
    for name in names:
        scorer = get_scorer(name)
        if scorer.needs_gradients and getattr(calib_result, "grad_norm", None) is None:
            continue
        out[name] = scorer(calib_result, seed).tolist()
    return out
