"""Where compensation's d x d float64 matrices live: host memory up to a budget, then files on disk.

Why: a run's statistics and maps are d x d float64 each (512 MiB at d = 8192, a 70B model), per fold, and
the candidate plans of one search may remove many different runs: gigabytes the host may not have. The
memory plan gives the search a room (``MemoryPlan.selection_room_bytes``: what ``--max-memory`` leaves once
the search's own working set is counted); matrices past it are memory-mapped files under the offload
folder (``--offload-dir``), which the kernel pages in as the solve reads them and may evict (page cache,
not the process's own memory). Without an offload folder a search that needs more than the room stops with
the exact figure and the fix, instead of running past the budget. Every figure is exact: the store counts
each matrix it hands out until it is released.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile

import numpy as np
import torch

from ..sizes import fmt_bytes

log = logging.getLogger(__name__)


class MatrixStore:
    """Float64 CPU tensors in memory while ``room_bytes`` allows (None: no limit), else in ``spill_dir``.

    ``zeros(shape)`` / ``keep(tensor)`` hand out stored tensors; ``release(tensor)`` frees one (its file is
    deleted); ``close()`` frees everything. ``resident_bytes``/``spilled_bytes`` and their peaks are exact.
    """

    def __init__(self, room_bytes: int | None = None, spill_dir: str | os.PathLike | None = None,
                 what: str = "--max-memory") -> None:
        if room_bytes is not None and room_bytes < 0:
            raise ValueError(f"matrix store: room_bytes must be >= 0, got {room_bytes}")
        self.room_bytes, self.what = room_bytes, what
        self._spill_root = None if spill_dir is None else os.fspath(spill_dir)
        self._dir: str | None = None
        # id(tensor) -> (the tensor, its bytes, its file or None): the store owns what it counts
        self._held: dict[int, tuple[torch.Tensor, int, str | None]] = {}
        self.resident_bytes = self.spilled_bytes = 0
        self.peak_resident_bytes = self.peak_spilled_bytes = 0
        self._warned = False

    def zeros(self, *shape: int) -> torch.Tensor:
        """A stored float64 tensor of zeros."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * 8
        if self._fits(nbytes):
            return self._count(torch.zeros(*shape, dtype=torch.float64), nbytes, None)
        path = self._new_file()
        mapped = np.memmap(path, dtype=np.float64, mode="w+", shape=tuple(shape))  # a new file reads as zeros
        return self._count(torch.from_numpy(mapped), nbytes, path)

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (float64, CPU) in the store: itself when it fits in memory, else a copy on disk."""
        if id(tensor) in self._held:  # already counted
            return tensor
        tensor = (tensor.detach() if tensor.requires_grad else tensor).to("cpu", torch.float64)  # itself if it can
        nbytes = tensor.numel() * 8
        if self._fits(nbytes):
            return self._count(tensor, nbytes, None)
        out = self.zeros(*tensor.shape)
        out.copy_(tensor)
        return out

    def release(self, *tensors: torch.Tensor | None) -> None:
        """Free stored tensors (the caller drops its references); unknown ones are ignored."""
        for t in tensors:
            if t is None or id(t) not in self._held:
                continue
            _, nbytes, path = self._held.pop(id(t))
            if path is None:
                self.resident_bytes -= nbytes
            else:
                self.spilled_bytes -= nbytes
                os.unlink(path)  # the mapping stays valid until its last reference goes

    def is_spilled(self, tensor: torch.Tensor) -> bool:
        entry = self._held.get(id(tensor))
        return entry is not None and entry[2] is not None

    def close(self) -> None:
        self._held.clear()
        self.resident_bytes = self.spilled_bytes = 0
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    # -- internals ----------------------------------------------------------------------------------------
    def _fits(self, nbytes: int) -> bool:
        if self.room_bytes is None or self.resident_bytes + nbytes <= self.room_bytes:
            return True
        if self._spill_root is None:
            raise ValueError(
                f"compensation: the search needs {fmt_bytes(self.resident_bytes + nbytes)} of d x d float64 "
                f"statistics and maps at once, but {self.what} leaves {fmt_bytes(self.room_bytes)} for them once "
                "the rest of the search is counted; pass --offload-dir DIR (offload_dir=) to keep the rest on "
                "disk, raise the budget, or use --no-compensate (compensate=False)")
        if not self._warned:
            log.info("compensation: past %s of d x d matrices in memory (%s); the rest go to %s",
                     fmt_bytes(self.room_bytes), self.what, self._spill_root)
            self._warned = True
        return False

    def _new_file(self) -> str:
        if self._dir is None:
            os.makedirs(self._spill_root, exist_ok=True)
            self._dir = tempfile.mkdtemp(prefix="sglp-matrices-", dir=self._spill_root)
        fd, path = tempfile.mkstemp(suffix=".f64", dir=self._dir)
        os.close(fd)
        return path

    def _count(self, tensor: torch.Tensor, nbytes: int, path: str | None) -> torch.Tensor:
        self._held[id(tensor)] = (tensor, nbytes, path)
        if path is None:
            self.resident_bytes += nbytes
            self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
        else:
            self.spilled_bytes += nbytes
            self.peak_spilled_bytes = max(self.peak_spilled_bytes, self.spilled_bytes)
        return tensor

    def __del__(self) -> None:
        if getattr(self, "_dir", None) is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
