"""Byte counts as people write them (``"8GiB"``, ``"512MB"``, ``1e9``) and as we print them."""
from __future__ import annotations

import re

import numpy as np

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value, name: str) -> int | None:
    """``None`` | int bytes | strings like ``"8GiB"``, ``"512MB"`` -> int bytes."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected bytes as an int or a string like '8GiB', got {value!r}")
    if isinstance(value, (int, np.integer)):
        if value < 0:
            raise ValueError(f"{name}: expected a non-negative byte count, got {value}")
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
        raise ValueError(f"{name}: cannot parse {value!r}; write bytes like 8000000000, '8GB' or '8GiB'")
    raise TypeError(f"{name}: expected bytes as an int or a string like '8GiB', got {type(value).__name__}")


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
