"""Every selector by name: rankings that remove the lowest score per segment, and the verified search.

One registry serves the API, the CLI's choices, ``sglp compare`` and the plan's validation. A selector turns
the evidence one analysis gathered (scores, last-token states, a verifier) into the removed blocks inside the
frame (segments, protection, budget split) and a record of how it chose them, which ``plan.py`` stores.

- ranking selectors (``gradnorm`` the paper's, ``taylor``, ``block_influence``, ``relative_update``,
  ``random``): the budget is split over the segments in proportion to their size, and each segment loses its
  lowest-scoring blocks (``frame.py``).
- search selector ``verified`` (the default): candidate plans checked against the real calibration loss,
  plain and compensated (``verified.py``); it shortlists by ``relative_update``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import regularization as R
from .frame import protected_blocks, select_removed, split_budget
from .protocols import Verifier
from .scores import SCORERS
from .settings import SearchSettings
from .verified import verified_pick


@dataclasses.dataclass(frozen=True)
class Frame:
    """Where a selector may remove blocks: the segments, the protected ends, whether a segment may empty."""

    segments: Sequence[Sequence[int]]
    num_blocks: int
    protect_first: int = 0
    protect_last: int = 0
    allow_empty_segments: bool = False

    @property
    def protected(self) -> set[int]:
        return protected_blocks(self.num_blocks, self.protect_first, self.protect_last)

    def per_segment(self, n: int) -> list[int]:
        """The proportional budget split (raises when ``n`` blocks do not fit the frame)."""
        return split_budget(self.segments, n, protected=self.protected,
                            allow_empty_segments=self.allow_empty_segments)


@dataclasses.dataclass
class Evidence:
    """What one analysis measured that selectors choose from."""

    scores: Mapping[str, Sequence[float]]
    last_token_hidden: np.ndarray | None = None  # [L+1, n_seqs, d], Gromov's angular run
    verifier: Verifier | None = None             # the search's judge (kept block inputs)
    settings: SearchSettings | None = None       # resolved search settings
    compensation_module: str | None = None       # the projection compensation folds into
    calib_windows: int = 0                       # calibration windows (compensation maps are refit on all)


@dataclasses.dataclass
class Choice:
    """A selector's answer: the removed blocks, how they were chosen, and compensation maps if any."""

    removed: list[int]
    record: dict[str, Any] | None = None          # the plan's ``selection`` entry (searches)
    transforms: dict[int, Any] | None = None      # {block before a removed run: T [d, d]}
    compensation: dict[str, Any] | None = None    # the plan's ``compensation`` entry


@dataclasses.dataclass(frozen=True)
class Selector:
    """A named way of choosing blocks; ``score`` is the score it ranks (or shortlists) by."""

    name: str
    kind: str  # "ranking" | "search"
    score: str
    needs_gradients: bool
    description: str

    def select(self, n: int, frame: Frame, evidence: Evidence) -> Choice:
        if self.score not in evidence.scores:
            raise ValueError(f"scorer: {self.name!r} has no scores (computed: {sorted(evidence.scores)}); "
                             "gradient scorers need calibration with gradients: analyze(..., gradients=True)")
        if self.kind == "ranking":
            removed = select_removed(frame.segments, evidence.scores[self.score], frame.per_segment(n),
                                     frame.protected)
            return Choice(removed=removed)
        return _verified_search(n, frame, evidence)


def _verified_search(n: int, frame: Frame, evidence: Evidence) -> Choice:
    verifier, settings = evidence.verifier, evidence.settings
    if verifier is None or settings is None:
        raise ValueError("scorer 'verified': this analysis kept no block inputs to verify with; run "
                         "analyze(..., scorer='verified')")
    if "block_influence" not in evidence.scores:
        raise ValueError("scorer 'verified': needs the forward statistics relative_update and block_influence")
    frame.per_segment(n)  # the budget must fit the frame
    found = verified_pick(segments=frame.segments, n=n, relative_update=evidence.scores["relative_update"],
                          block_influence=evidence.scores["block_influence"], verifier=verifier,
                          last_token_hidden=evidence.last_token_hidden, protect_first=frame.protect_first,
                          protect_last=frame.protect_last, allow_empty_segments=frame.allow_empty_segments,
                          shortlist=settings.shortlist, compensate=bool(settings.compensate),
                          greedy=bool(settings.greedy), run_candidates=settings.run_candidates)
    record = {**found.to_dict(), "shortlist": settings.shortlist, "verify_windows": verifier.num_windows,
              **({"run_candidates": settings.run_candidates} if settings.run_candidates else {}),
              "self_fit_windows": settings.self_fit_windows or 0,
              **({"self_fit_len": settings.self_fit_len} if settings.self_fit_len else {})}
    choice = Choice(removed=list(found.removed), record=record)
    if found.compensated:  # the chosen plan's maps, fitted on every window (their in-sample loss is not
        # checked: a number nothing decides on would cost one more pass, ~10% of the search on SmolLM2)
        choice.transforms = verifier.transforms(found.removed, maps=found.maps)
        policy = R.get_policy(settings.map_policy)
        choices = verifier.map_choices(found.removed)
        folds = getattr(verifier, "folds", settings.folds)  # no more folds than check windows
        choice.compensation = {
            "method": "least squares folded into the MLP output projection (selection/compensation.py); "
                      + ("ridge strength and shrinkage towards the identity chosen per map by "
                         f"{folds}-fold cross-validation (selection/regularization.py)" if policy.cross_validated
                         else {"fixed": "fixed ridge strength", "replaceme": "no ridge (ReplaceMe)"}[policy.name])
                      + ("; rows weighted by 1/||target||" if policy.weighted else "; unweighted rows"),
            "module": evidence.compensation_module, "policy": policy.name, "folds": folds,
            "maps": {str(p): choices[p].to_dict() for p in found.maps},
            "fit_windows": evidence.calib_windows + settings.fit_windows + (settings.self_fit_windows or 0),
            "fit_only_windows": settings.fit_windows,
            "self_fit_windows": settings.self_fit_windows or 0,
            **({"self_fit_len": settings.self_fit_len} if settings.self_fit_len else {})}
    store = getattr(verifier, "matrices", None)
    if settings.compensate and store is not None:  # what the d x d statistics and maps took (the final ones too)
        record["matrices"] = {"peak_in_memory_bytes": int(store.peak_resident_bytes),
                              "peak_on_disk_bytes": int(store.peak_spilled_bytes)}
    return choice


SELECTORS: dict[str, Selector] = {
    "verified": Selector("verified", "search", "relative_update", False,
                         "candidate plans checked against the calibration loss, plain and compensated (default)"),
    **{s.name: Selector(s.name, "ranking", s.name, s.needs_gradients, s.description) for s in SCORERS.values()},
}
DEFAULT_SELECTOR = "verified"


def get_selector(name: str) -> Selector:
    """The selector called ``name``; a ValueError listing every name otherwise."""
    if name not in SELECTORS:
        raise ValueError(f"scorer: expected one of {sorted(SELECTORS)}, got {name!r}")
    return SELECTORS[name]
