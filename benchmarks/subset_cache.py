"""Per-subset results of a long benchmark, kept on disk so that a stopped run resumes and the subsets of one
benchmark may be computed in separate sessions.

Why: the SmolLM2 quality benchmark runs one calibration subset at a time and takes 20-50 min per subset on a
2-core CPU, more than one session can spare beside its other work. A subset's results are only valid for the
code that produced them, so each is stored under a key hashed from every source file the numbers depend on
(the package, its C++ and Triton sources, the benchmark script and the held-out texts' loader), the settings
and the library versions: change any of them and the cached subsets are computed again, never mixed in.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("sglp_fast/**/*.py", "csrc/**/*.cpp", "csrc/**/*.h", "kernels/**/*.py")


def code_key(scripts: Iterable[str | os.PathLike], settings: Mapping[str, Any], root: Path = ROOT) -> str:
    """A hex digest of the package's sources under ``root``, ``scripts`` (paths), ``settings`` (JSON-able)
    and the versions of torch and transformers."""
    import torch  # noqa: PLC0415  (the versions are part of the key)
    import transformers  # noqa: PLC0415

    digest = hashlib.sha256()
    files = sorted({p for pattern in SOURCES for p in root.glob(pattern) if "__pycache__" not in p.parts})
    files += [Path(s).resolve() for s in scripts]
    for path in files:
        name = path.relative_to(root) if path.is_relative_to(root) else path
        digest.update(str(name).encode() + b"\0" + path.read_bytes() + b"\0")
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    digest.update(json.dumps({"settings": settings, "versions": versions}, sort_keys=True).encode())
    return digest.hexdigest()


class SubsetCache:
    """``dir/subset-{s}.json`` per subset: {"key": ..., "record": ...}; a file with another key is stale."""

    def __init__(self, directory: str | os.PathLike, key: str):
        self.directory, self.key = Path(directory), key

    def path(self, subset: int) -> Path:
        return self.directory / f"subset-{subset}.json"

    def load(self, subset: int) -> dict | None:
        """The subset's record if it was computed by this code with these settings, else None."""
        try:
            stored = json.loads(self.path(subset).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return stored["record"] if isinstance(stored, dict) and stored.get("key") == self.key else None

    def save(self, subset: int, record: dict) -> None:
        """Write atomically (a temporary file renamed over the old one): a stopped run leaves no half file."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.path(subset).with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"key": self.key, "record": record}, indent=1), encoding="utf-8")
        os.replace(tmp, self.path(subset))


def pack(table: Mapping[tuple, Any]) -> list[list]:
    """A dict with tuple keys as JSON (a list of [key..., value] rows); ``unpack`` restores it."""
    return [[*key, value] for key, value in table.items()]


def unpack(rows: Iterable[list]) -> dict[tuple, Any]:
    return {tuple(row[:-1]): row[-1] for row in rows}
