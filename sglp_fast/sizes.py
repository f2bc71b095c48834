"""Byte counts as people write them (``"8GiB"``, ``"512MB"``, ``"1e9"``) and as we print them.

One parser for the Python API (``parse_bytes(value, name)``) and the CLI (``--max-memory``). A size is a
number (``8``, ``1.5``, ``1e9``, ``1.5e9``) and an optional unit, case-insensitive, with or without the
trailing ``B``: decimal ``k``/``M``/``G``/``T`` (``8G`` = ``8GB`` = 8·10⁹ bytes) or binary
``Ki``/``Mi``/``Gi``/``Ti`` (``8Gi`` = ``8GiB`` = 8·2³⁰ bytes). Fractions of a byte are dropped.
"""
from __future__ import annotations

import math

import re
from dataclasses import dataclass
from fractions import Fraction

from .checks import is_int

_DECIMAL = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
UNITS: dict[str, int] = {**_DECIMAL, **_BINARY}
UNITS.update({f"{unit}b": factor for unit, factor in list(UNITS.items())})  # "" + "b" = "b": plain bytes

_SIZE = re.compile(r"\s*((?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*", re.IGNORECASE)
HOW_TO_WRITE = ("write bytes like 8000000000 or 1e9, or a number with a unit: decimal k, M, G, T "
                "(8G = 8GB = 8*10^9 bytes) or binary Ki, Mi, Gi, Ti (8Gi = 8GiB = 8*2^30 bytes)")


@dataclass(frozen=True)
class Limit:
    """A byte limit that carries more than its size (``calibration.memory.Budget``: what later stages hold).

    Why here: every reader of a budget argument parses it with ``parse_bytes``, which takes the ``limit``."""

    limit: int | str | None = None


def size_from_text(text: str) -> int:
    """``"8GiB"``, ``"500MB"``, ``"1e9"``, ``"1.5 G"`` -> bytes; ValueError ``cannot parse ...`` (without an
    argument name: the callers add theirs) on anything else."""
    m = _SIZE.fullmatch(text)
    unit = m.group(2).lower() if m else None
    if unit not in UNITS:
        raise ValueError(f"cannot parse {text!r} as a size; {HOW_TO_WRITE}")
    return int(Fraction(m.group(1)) * UNITS[unit])


def parse_bytes(value, name: str) -> int | None:
    """``None`` | an int number of bytes | a string like ``"8GiB"`` or ``"1e9"`` -> int bytes (or None).

    A ``Limit`` gives its ``limit``. ``name`` (the argument or flag) starts every error message."""
    if isinstance(value, Limit):
        value = value.limit
    if value is None:
        return None
    if is_int(value):
        if value < 0:
            raise ValueError(f"{name}: expected a non-negative byte count, got {value}")
        return int(value)
    if isinstance(value, str):
        try:
            return size_from_text(value)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
    raise TypeError(f"{name}: expected bytes as an int or a string like '8GiB' or '1e9', got {value!r} "
                    f"({type(value).__name__}); convert it with int(...) or pass a string")


def fmt_bytes(n: float, round_up: bool = False) -> str:
    """``n`` bytes in the largest binary unit below it, one decimal. ``round_up``: never below ``n`` (a
    figure a user is told to pass as a budget must be enough when passed back as printed)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{math.ceil(n) if round_up else n:.0f} {unit}"
            return f"{math.ceil(n * 10) / 10 if round_up else n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
