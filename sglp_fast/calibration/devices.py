"""The compute device: a name resolved to the device it means, and the budget held on it.

A device named without an index ("cuda") is the current one ("cuda:0" by default).

Why: torch compares devices literally (``torch.device("cuda:0") == torch.device("cuda")`` is False), and a
model's parameters always carry their index. Left unresolved, ``--device cuda`` made a model that already
sits on the GPU look like one on another device: every block was copied on every use, a prefetch thread
copied nothing, and the memory plan counted the weights twice.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch


def resolve_device(device: Any) -> torch.device:
    """``device`` as a ``torch.device`` with its index (a CUDA device without one: the current device).
    Where torch has no CUDA, "cuda" stays as given (plans made for a GPU on a CPU machine; running there
    fails with torch's own error)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


@contextlib.contextmanager
def allocator_cap(device: Any, limit: int | None) -> Iterator[None]:
    """On a CUDA device with a budget: torch's caching allocator may reserve at most ``limit`` bytes more than
    it held on entry (``torch.cuda.set_per_process_memory_fraction``), the previous cap restored on exit.

    Why: the memory plan counts the bytes tensors take, and the allocator keeps freed blocks cached for reuse:
    with blocks of 1.6 GiB, 512 MiB activation slots and float64 solves of other sizes, its reserve grew 8.5 GiB
    past what was allocated on an H200 (benchmarks/results/scale_gpu.md: 17.4 GiB allocated, 25.9 GiB reserved
    under a 24 GiB budget). Capped, it returns cached blocks to the device before it grows past the budget, so
    ``max_memory`` holds for what the card sees, not only for the tensors. No-op on the CPU or without a limit."""
    device = resolve_device(device) if device is not None else None
    if device is None or device.type != "cuda" or limit is None or not torch.cuda.is_available():
        yield
        return
    total = torch.cuda.get_device_properties(device).total_memory
    get = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch >= 2.9; before it: uncapped
    before = get(device) if get is not None else 1.0
    held = torch.cuda.memory_reserved(device)  # the caller's own, before this run (not the run's budget)
    torch.cuda.set_per_process_memory_fraction(min(before, (held + int(limit)) / total), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(before, device)
