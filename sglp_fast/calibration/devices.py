"""A device named without an index ("cuda") is the current one ("cuda:0" by default).

Why: torch compares devices literally (``torch.device("cuda:0") == torch.device("cuda")`` is False), and a
model's parameters always carry their index. Left unresolved, ``--device cuda`` made a model that already
sits on the GPU look like one on another device: every block was copied on every use, a prefetch thread
copied nothing, and the memory plan counted the weights twice.
"""
from __future__ import annotations

from typing import Any

import torch


def resolve_device(device: Any) -> torch.device:
    """``device`` as a ``torch.device`` with its index (a CUDA device without one: the current device).
    Where torch has no CUDA, "cuda" stays as given (plans made for a GPU on a CPU machine; running there
    fails with torch's own error)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device
