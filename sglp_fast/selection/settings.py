"""The verified search's settings, validated once (instead of loose keyword arguments passed around)."""
from __future__ import annotations

import dataclasses

from ..checks import check_int, check_optional_bool

DEFAULT_SHORTLIST = 4
DEFAULT_VERIFY_WINDOWS = 4  # the check without compensation (the greedy's many small checks)
DEFAULT_FOLDS = 4
MAP_POLICIES = ("cv", "cv-weighted", "fixed", "replaceme")  # selection/regularization.py
DEFAULT_SELF_FIT_WINDOWS = 16  # windows the model samples itself for the maps' fit (docs/quality.md round 7)
DEFAULT_RUN_CANDIDATES = 0  # contiguous runs checked besides the proposals (opt-in: docs/quality.md round 10)


def effective_folds(folds: int, check_windows: int) -> int:
    """Cross-fitting folds the check really has: no more than its windows (an empty fold fits nothing and
    judges nothing, but its statistics and maps would take d x d memory each)."""
    return max(1, min(int(folds), int(check_windows)))


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """How the verified search checks plans.

    ``verify_windows``: calibration windows the loss is checked on; None = every window when compensating
    (cross-fitted over ``folds`` folds) and for sentence-embedding encoders (one term per window), else 4
    (about a thousand loss terms). ``shortlist``: greedy candidates checked per removal. ``compensate``: also
    weigh compensated plans; None = when the architecture allows it. ``greedy``: run the loss-checked greedy;
    None = only without compensation. ``folds``: cross-fitting folds of the check windows (1 = the maps are
    fitted on the windows outside the check only). ``fit_windows``: extra calibration windows that only feed
    the compensation statistics (forward only; not in the CKA, the scores or the check).
    ``self_fit_windows``: windows the dense model samples itself (``calibration.self_text``) that also only
    feed the compensation statistics, so that the maps are fitted on wider text than the calibration text;
    None = ``DEFAULT_SELF_FIT_WINDOWS`` when compensating a model that can sample (a causal LM held in
    memory), else 0. ``self_fit_len``: tokens per sampled window (None: the calibration windows' length);
    shorter windows sample in fewer, wider steps (docs/quality.md round 11). ``map_policy``: how each map
    is regularized (``regularization.POLICIES``).
    ``run_candidates``: contiguous runs of lowest all-token angular distance checked as extra candidates
    (0: Gromov's one run only; docs/quality.md rounds 9 and 10).
    ``resolved()`` fills every None for one model and calibration set.
    """

    verify_windows: int | None = None
    shortlist: int = DEFAULT_SHORTLIST
    compensate: bool | None = None
    greedy: bool | None = None
    folds: int = DEFAULT_FOLDS
    fit_windows: int = 0
    self_fit_windows: int | None = None
    self_fit_len: int | None = None
    map_policy: str = "cv"
    run_candidates: int = DEFAULT_RUN_CANDIDATES
    check_every_window: bool = False  # set by resolved(): the check uses every calibration window

    def __post_init__(self) -> None:
        check_int("verify_windows", self.verify_windows, 1, expected="a positive int", optional=True)
        check_int("shortlist", self.shortlist, 1, expected="a positive int")
        check_int("folds", self.folds, 1, expected="a positive int (cross-fitting folds)")
        check_int("run_candidates", self.run_candidates, 0,
                  expected="a non-negative int (contiguous runs the search checks besides its candidates)")
        check_int("fit_windows", self.fit_windows, 0, expected="a non-negative int (extra fit-only windows)")
        check_int("self_fit_windows", self.self_fit_windows, 0, optional=True,
                  expected="a non-negative int (windows the model samples for the maps' fit) or None (auto)")
        check_int("self_fit_len", self.self_fit_len, 2, optional=True,
                  expected="an int >= 2 (tokens per sampled window: the start token and the samples) or None "
                           "(the calibration windows' length)")
        check_optional_bool("compensate", self.compensate, "auto")
        check_optional_bool("greedy", self.greedy, "auto: only without compensation")
        if self.map_policy not in MAP_POLICIES:
            raise ValueError(f"map_policy: expected one of {list(MAP_POLICIES)}, got {self.map_policy!r}")

    def resolved(self, *, loss_kind: str, calib_windows: int, compensation_blocked_by: str | None,
                 search: bool = True, sampling_blocked_by: str | None = None) -> SearchSettings:
        """Every None decided: ``compensation_blocked_by`` says why the model cannot be compensated (or None),
        ``sampling_blocked_by`` why it cannot sample its own fit windows (or None)."""
        why = compensation_blocked_by
        if not search:
            why = "it is part of the 'verified' scorer"
        elif why is None:
            why = self._no_fit_data(calib_windows)
        if self.compensate and why is not None:
            raise ValueError(f"compensate: not possible here: {why}; drop compensate=True (--compensate)")
        if self.fit_windows and (self.compensate is False or why is not None):
            raise ValueError(f"fit_windows: extra fit windows only feed compensation, which is off here"
                             f"{'' if why is None else ' (' + why + ')'}; drop fit_windows (--fit-windows)")
        compensate = self.compensate is not False and why is None
        self_fit = self._self_fit_windows(compensate, why, sampling_blocked_by)
        if self.self_fit_len is not None and not self_fit:
            raise ValueError("self_fit_len: sets the length of the self-sampled fit windows, and none are "
                             "sampled here (self_fit_windows is 0, or compensation or sampling is off); drop "
                             "self_fit_len (--self-fit-len)")
        every = self.verify_windows is None and (loss_kind == "pooled_energy" or compensate)
        windows = calib_windows if every else (self.verify_windows or DEFAULT_VERIFY_WINDOWS)
        greedy = (not compensate) if self.greedy is None else self.greedy
        return dataclasses.replace(self, verify_windows=min(windows, calib_windows) if every else windows,
                                   compensate=compensate, greedy=greedy, check_every_window=every,
                                   self_fit_windows=self_fit)

    def _self_fit_windows(self, compensate: bool, no_compensation: str | None, no_sampling: str | None) -> int:
        """The sampled fit windows: asked for explicitly they must be usable (a clear error, never dropped)."""
        if self.self_fit_windows is None:
            return DEFAULT_SELF_FIT_WINDOWS if compensate and no_sampling is None else 0
        if self.self_fit_windows and not compensate:
            why = "" if no_compensation is None else f" ({no_compensation})"
            raise ValueError(f"self_fit_windows: sampled fit windows only feed compensation, which is off here{why}; "
                             "drop self_fit_windows (--self-fit-windows) or set it to 0")
        if self.self_fit_windows and no_sampling is not None:
            raise ValueError(f"self_fit_windows: the model cannot sample its own fit windows here: {no_sampling}; "
                             "set self_fit_windows=0 (--self-fit-windows 0) or fit on text with fit_windows "
                             "(--fit-windows)")
        return int(self.self_fit_windows)

    def _no_fit_data(self, calib_windows: int) -> str | None:
        """Why no window would be left to fit a map on once the check's held-out fold is set aside."""
        check = calib_windows if self.verify_windows is None else min(self.verify_windows, calib_windows)
        outside = calib_windows - check + self.fit_windows + (self.self_fit_windows or 0)
        if self.folds == 1 and outside <= 0:
            return (f"all {calib_windows} calibration windows are used by the loss check (verify_windows="
                    f"{check}) and folds=1 leaves none to fit on; use folds >= 2 or more calibration windows")
        if self.folds > 1 and outside <= 0 and check < 2:
            return f"{calib_windows} calibration window(s) cannot be split into a fit and a held-out part"
        return None

    def with_calibration_windows(self, windows: int) -> SearchSettings:
        """After tokenizing: a check over every window counts the windows calibration really has."""
        return dataclasses.replace(self, verify_windows=windows) if self.check_every_window else self
