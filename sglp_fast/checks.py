"""Argument checks shared by every stage, so that one bad value gets the same clear message everywhere.

Messages read ``name: expected <what>, got <value>[; <fix>]`` (the argument, what was expected, what was
received, and the fix), the form DESIGN.md asks of every error.
"""
from __future__ import annotations

import numbers
from typing import Any


def is_int(value: Any) -> bool:
    """A real integer (Python or numpy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None, *,
              expected: str | None = None, fix: str = "", optional: bool = False) -> int | None:
    """``value`` as an int within [minimum, maximum] (None: unbounded); ``optional`` lets None through."""
    if optional and value is None:
        return None
    ok = is_int(value) and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        if expected is None:
            if minimum is not None and maximum is not None:
                expected = f"an int in [{minimum}, {maximum}]"
            elif minimum == 1:
                expected = "a positive int"
            elif minimum == 0:
                expected = "a non-negative int"
            elif minimum is not None:
                expected = f"an int >= {minimum}"
            else:
                expected = "an int"
            if optional:
                expected += " or None"
        raise ValueError(f"{name}: expected {expected}, got {value!r}" + (f"; {fix}" if fix else ""))
    return int(value)


def check_choice(name: str, value: Any, allowed: Any) -> Any:
    """``value`` when it is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {tuple(allowed)}, got {value!r}")
    return value


def check_optional_bool(name: str, value: Any, meaning_of_none: str) -> bool | None:
    """True, False or None (``meaning_of_none`` says what None does)."""
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{name}: expected True, False or None ({meaning_of_none}), got {value!r}")
    return value
