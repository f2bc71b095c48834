"""Keep the checkout's top-level ``kernels/`` folder from shadowing Hugging Face's ``kernels`` package.

Why: ``kernels/`` sits at the top of the repository (DESIGN.md) and installs as ``sglp_fast.kernels``; where
the checkout's root is on ``sys.path`` (``python -m sglp_fast`` or ``python -m pytest`` started there), a
plain ``import kernels`` finds the folder. transformers 5.x requires the kernel-hub distribution ``kernels``
and imports names from it when it loads any model's activations; finding our folder instead, it fails with
"cannot import name 'CUDAProperties' from 'kernels'". Importing the real package once, with the checkout's
root out of the path, puts it in ``sys.modules`` first, so every later ``import kernels`` gets it.
(Installed from a wheel, the folder exists only as ``sglp_fast/kernels`` and nothing is shadowed.)
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path


def _origin(name: str) -> Path | None:
    """Where ``import name`` would load from (without importing it), or None."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    origin = getattr(spec, "origin", None) if spec is not None else None
    return Path(origin).resolve() if origin else None


def hub_installed() -> bool:
    """Whether Hugging Face's kernel-hub distribution ``kernels`` is installed."""
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def unshadow_hub_kernels() -> None:
    """Import the installed ``kernels`` distribution if ``import kernels`` would load our folder instead.

    A no-op where nothing is shadowed (a wheel install, a run started outside the checkout) or where the
    kernel hub is not installed (then transformers finds no version on our folder and leaves it alone)."""
    ours = _origin("sglp_fast.kernels")
    if ours is None:
        return
    loaded = sys.modules.get("kernels")
    if loaded is not None:
        if Path(getattr(loaded, "__file__", "") or "").resolve() == ours and hub_installed():
            raise ImportError(
                f"the module 'kernels' was imported from sglp-fast's own folder ({ours.parent}) because the "
                "checkout's root is on sys.path; transformers needs Hugging Face's 'kernels' package under "
                "that name: import sglp_fast before anything imports 'kernels', or start Python outside the "
                "checkout")
        return
    if _origin("kernels") != ours or not hub_installed():
        return
    root = ours.parent.parent
    saved = list(sys.path)
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != root]
    try:
        importlib.import_module("kernels")
    finally:
        sys.path[:] = saved
