"""Per-batch cache of what CKA's layer-major order needs later: device -> CPU (pinned) -> disk, byte budget.

In the offloaded calibration order (all batches of layer 0, then all of layer 1, ...) a batch's HSIC row can
only be formed once every layer of it has been seen, so each (batch, layer) leaves one item behind: its
centered Gram K̃ (n×n) or its centered activations (n×d), whichever the cost model picked. The cache keeps
items on the compute device while they fit the budget, then in CPU memory (pinned when the device is a GPU,
so copies back overlap), then in files on disk; reads return row slices so the consumer can stream panels
without ever loading a whole n×n item.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import torch

CACHE_TIERS = ("auto", "device", "cpu", "disk")

_NUMPY_STORAGE = {  # numpy has no bfloat16: 16-bit floats travel through disk as raw int16 bits
    torch.float32: (np.float32, None),
    torch.float64: (np.float64, None),
    torch.float16: (np.float16, None),
    torch.bfloat16: (np.int16, torch.int16),
}


def default_memory_budget(device: torch.device) -> int:
    """Half of what is free now: on a GPU its free memory, on the CPU the available RAM."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.5)
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 4 << 30


class _DiskItem:
    """One cached tensor in a raw file; reads map only the requested rows and unmap them at once."""

    def __init__(self, path: str, tensor: torch.Tensor):
        np_dtype, view_as = _NUMPY_STORAGE[tensor.dtype]
        self.path, self.shape, self.dtype, self.np_dtype = path, tuple(tensor.shape), tensor.dtype, np_dtype
        src = tensor.detach().to("cpu").contiguous()
        arr = (src.view(view_as) if view_as is not None else src).numpy()
        arr.tofile(path)
        self.nbytes = arr.nbytes

    def rows(self, start: int, stop: int) -> torch.Tensor:
        row_len = int(np.prod(self.shape[1:], dtype=np.int64))
        itemsize = np.dtype(self.np_dtype).itemsize
        mm = np.memmap(self.path, dtype=self.np_dtype, mode="r", offset=start * row_len * itemsize,
                       shape=(stop - start, *self.shape[1:]))
        out = torch.from_numpy(np.array(mm))  # copy, then drop the mapping so its pages leave our RSS
        del mm
        _storage, view_as = _NUMPY_STORAGE[self.dtype]
        return out.view(self.dtype) if view_as is not None else out


class BatchItemCache:
    """Items keyed by (batch_id, layer). ``tier`` is one of CACHE_TIERS; the budget bounds in-memory bytes.

    "device": on the compute device; "cpu": CPU memory (pinned when computing on a GPU); "disk": files;
    "auto": the compute device up to ``budget_bytes`` (default: half its free memory), then (GPU only) pinned
    CPU memory up to half the available RAM, then disk.
    """

    def __init__(self, tier: str, device: torch.device, budget_bytes: int | None = None,
                 directory: str | os.PathLike | None = None):
        if tier not in CACHE_TIERS:
            raise ValueError(f"cache: expected one of {CACHE_TIERS}, got {tier!r}")
        if budget_bytes is not None and (not isinstance(budget_bytes, int) or budget_bytes < 0):
            raise ValueError(f"cache_budget_bytes: expected a non-negative int or None, got {budget_bytes!r}")
        self.tier, self.device = tier, torch.device(device)
        self.budget = budget_bytes
        if tier == "auto" and budget_bytes is None:
            self.budget = default_memory_budget(self.device)
        # "auto" on a GPU: device up to the budget, then pinned CPU memory up to half the free RAM, then disk
        self.cpu_budget = default_memory_budget(torch.device("cpu")) \
            if (tier == "auto" and self.device.type == "cuda") else 0
        self.bytes_in_cpu_spill = 0
        self._user_dir = directory
        self._dir: str | None = None
        self._items: dict[tuple, object] = {}
        self.bytes_in_memory = 0
        self.bytes_on_disk = 0
        self.peak_bytes_in_memory = 0

    # -- placement ---------------------------------------------------------------------------------------
    def _memory_home(self) -> tuple[torch.device, bool]:
        """Where an in-memory item lives, and whether it is pinned."""
        if self.tier == "cpu":
            return torch.device("cpu"), self.device.type == "cuda"
        return self.device, False

    def _disk_dir(self) -> str:
        if self._dir is None:
            if self._user_dir is not None:
                os.makedirs(self._user_dir, exist_ok=True)
                self._dir = tempfile.mkdtemp(prefix="sglp_cka_", dir=self._user_dir)
            else:
                self._dir = tempfile.mkdtemp(prefix="sglp_cka_")
        return self._dir

    def put(self, batch_id, layer: int, tensor: torch.Tensor) -> None:
        """Store ``tensor`` (the cache takes ownership: the caller must not write to it afterwards)."""
        key = (batch_id, layer)
        if key in self._items:
            raise ValueError(f"cache: item for batch {batch_id!r} layer {layer} is already cached")
        nbytes = tensor.numel() * tensor.element_size()
        fits = self.budget is None or self.bytes_in_memory + nbytes <= self.budget
        if self.tier == "auto" and not fits and self.bytes_in_cpu_spill + nbytes <= self.cpu_budget:
            buf = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            buf.copy_(tensor.detach())
            self._items[key] = buf
            self.bytes_in_cpu_spill += nbytes
            return
        if self.tier == "disk" or (self.tier == "auto" and not fits):
            path = os.path.join(self._disk_dir(), f"b{len(self._items)}_{abs(hash(key))}_l{layer}.bin")
            item = _DiskItem(path, tensor)
            self.bytes_on_disk += item.nbytes
            self._items[key] = item
            return
        if not fits:
            raise ValueError(
                f"cache_budget_bytes: caching batch {batch_id!r} layer {layer} needs {nbytes} more bytes but "
                f"{self.bytes_in_memory} of the {self.budget}-byte budget are used; raise the budget, or use "
                "cache='auto' (spills to disk) or cache='disk'"
            )
        home, pin = self._memory_home()
        stored = tensor.detach()
        if stored.device != home:
            if pin:
                buf = torch.empty(stored.shape, dtype=stored.dtype, pin_memory=True)
                buf.copy_(stored, non_blocking=False)
                stored = buf
            else:
                stored = stored.to(home)
        self._items[key] = stored
        self.bytes_in_memory += nbytes
        self.peak_bytes_in_memory = max(self.peak_bytes_in_memory, self.bytes_in_memory)

    def rows(self, batch_id, layer: int, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of an item, on the compute device."""
        item = self._items[(batch_id, layer)]
        if isinstance(item, _DiskItem):
            return item.rows(start, stop).to(self.device, non_blocking=True)
        return item[start:stop].to(self.device, non_blocking=True)

    def get(self, batch_id, layer: int) -> torch.Tensor:
        item = self._items[(batch_id, layer)]
        n = item.shape[0]
        return self.rows(batch_id, layer, 0, n)

    def drop_batch(self, batch_id) -> None:
        for key in [k for k in self._items if k[0] == batch_id]:
            item = self._items.pop(key)
            if isinstance(item, _DiskItem):
                self.bytes_on_disk -= item.nbytes
                os.remove(item.path)
            elif item.device.type == "cpu" and self.device.type == "cuda" and self.tier == "auto":
                self.bytes_in_cpu_spill -= item.numel() * item.element_size()
            else:
                self.bytes_in_memory -= item.numel() * item.element_size()

    def close(self) -> None:
        for batch_id in {k[0] for k in self._items}:
            self.drop_batch(batch_id)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __del__(self):  # best effort: temporary files never outlive the accumulator
        try:
            self.close()
        except Exception:
            pass
