"""The verified search's settings, validated once (instead of loose keyword arguments passed around)."""
from __future__ import annotations

import dataclasses

from ..checks import check_int, check_optional_bool

DEFAULT_SHORTLIST = 4
DEFAULT_VERIFY_WINDOWS = 4


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """How the verified search checks plans.

    ``verify_windows``: calibration windows the loss is checked on; None = 4 for token losses (about a
    thousand loss terms), every window for sentence-embedding encoders (one term per window).
    ``shortlist``: greedy candidates checked per removal. ``compensate``: also weigh compensated plans; None =
    when the architecture allows it and windows are left to fit on. ``greedy``: run the loss-checked greedy;
    None = only without compensation. ``resolved()`` fills every None for one model and calibration set.
    """

    verify_windows: int | None = None
    shortlist: int = DEFAULT_SHORTLIST
    compensate: bool | None = None
    greedy: bool | None = None
    check_every_window: bool = False  # set by resolved(): the check uses every calibration window

    def __post_init__(self) -> None:
        check_int("verify_windows", self.verify_windows, 1, expected="a positive int", optional=True)
        check_int("shortlist", self.shortlist, 1, expected="a positive int")
        check_optional_bool("compensate", self.compensate, "auto")
        check_optional_bool("greedy", self.greedy, "auto: only without compensation")

    def resolved(self, *, loss_kind: str, calib_windows: int, compensation_blocked_by: str | None,
                 search: bool = True) -> SearchSettings:
        """Every None decided: ``compensation_blocked_by`` says why the model cannot be compensated (or None)."""
        every = self.verify_windows is None and loss_kind == "pooled_energy"
        windows = calib_windows if every else (self.verify_windows or DEFAULT_VERIFY_WINDOWS)
        why = compensation_blocked_by
        if not search:
            why = "it is part of the 'verified' scorer"
        elif why is None and calib_windows <= windows:
            why = (f"all {calib_windows} calibration windows are used by the loss check (verify_windows="
                   f"{windows}); use more calibration windows")
        if self.compensate and why is not None:
            raise ValueError(f"compensate: not possible here: {why}; drop compensate=True (--compensate)")
        compensate = self.compensate is not False and why is None
        greedy = (not compensate) if self.greedy is None else self.greedy
        return dataclasses.replace(self, verify_windows=windows, compensate=compensate, greedy=greedy,
                                   check_every_window=every)

    def with_calibration_windows(self, windows: int) -> SearchSettings:
        """After tokenizing: a check over every window counts the windows calibration really has."""
        return dataclasses.replace(self, verify_windows=windows) if self.check_every_window else self
