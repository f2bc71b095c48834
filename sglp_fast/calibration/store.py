"""The activation store: tensors keyed by (slot, batch) on the device, then pinned CPU memory, then disk.

Why tiers: GradNorm needs every block's input kept until the top-down backward reaches it, which is
(L+1) x tokens x hidden bytes: more than a GPU holds for big models, sometimes more than RAM. Each tensor
goes to the first tier with room (first fit, in the order it is written), so the lower blocks' inputs stay
close and only the overflow pays for the disk.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass

import numpy as np
import torch

from ..sizes import fmt_bytes


def available_cpu_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else total physical memory."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class _Entry:
    tier: str
    tensor: torch.Tensor | None = None  # device / cpu tiers
    path: str | None = None  # disk tier
    shape: tuple = ()
    dtype: torch.dtype = torch.float32
    nbytes: int = 0


class ActivationCache:
    """Tensors keyed by (slot, batch) in the first tier with room: device, then CPU, then disk."""

    def __init__(self, device: torch.device, device_budget: int, cpu_budget: int, offload_dir: str | None):
        self.device = torch.device(device)
        self.budgets = {"device": device_budget if self.device.type != "cpu" else 0, "cpu": cpu_budget}
        self.used = {"device": 0, "cpu": 0, "disk": 0}
        self.peak = {"device": 0, "cpu": 0, "disk": 0}
        self.offload_dir = offload_dir
        self._dir: str | None = None
        self._entries: dict[tuple, _Entry] = {}
        self._pin = self.device.type == "cuda"

    def _disk_dir(self) -> str:
        if self.offload_dir is None:
            raise ValueError(
                "offload_dir: the activation cache exceeds max_device_memory + max_cpu_memory and no "
                "offload_dir was given; pass offload_dir=<a folder on a disk with room> or raise the budgets"
            )
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix=f"sglp-cache-{uuid.uuid4().hex[:8]}-", dir=self.offload_dir)
        return self._dir

    def put(self, slot, batch: int, t: torch.Tensor) -> None:
        self.free(slot, batch)
        t = t.detach()
        nbytes = tensor_bytes(t)
        for tier in ("device", "cpu"):
            if self.used[tier] + nbytes <= self.budgets[tier]:
                if tier == "device":
                    stored = t.to(self.device, copy=True) if t.device == self.device else t.to(self.device)
                elif t.device.type == "cpu" and not self._pin:
                    stored = t  # fresh output tensors: keeping them costs no copy
                else:
                    stored = torch.empty(t.shape, dtype=t.dtype, pin_memory=self._pin)
                    stored.copy_(t)
                self._add(slot, batch, _Entry(tier, tensor=stored, shape=tuple(t.shape), dtype=t.dtype, nbytes=nbytes))
                return
        path = os.path.join(self._disk_dir(), f"s{slot}_b{batch}.bin")
        raw = t.to("cpu").contiguous().view(torch.uint8).numpy().reshape(-1) if t.numel() else np.zeros(0, np.uint8)
        try:
            mm = np.memmap(path, dtype=np.uint8, mode="w+", shape=(max(raw.size, 1),))
            mm[: raw.size] = raw
            mm.flush()
            del mm
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise OSError(
                    errno.ENOSPC,
                    f"offload_dir: disk full while writing the activation cache to {self._dir!r} "
                    f"({fmt_bytes(self.used['disk'])} written, {fmt_bytes(nbytes)} more needed); free space, "
                    "point offload_dir at a bigger disk, or use fewer/shorter calibration batches",
                ) from err
            raise
        self._add(slot, batch, _Entry("disk", path=path, shape=tuple(t.shape), dtype=t.dtype, nbytes=nbytes))

    def _add(self, slot, batch, entry: _Entry) -> None:
        self._entries[(slot, batch)] = entry
        self.used[entry.tier] += entry.nbytes
        self.peak[entry.tier] = max(self.peak[entry.tier], self.used[entry.tier])

    def get(self, slot, batch: int, device=None) -> torch.Tensor:
        """The stored tensor on ``device`` (the compute device by default). Read-only for device tiers."""
        device = self.device if device is None else torch.device(device)
        e = self._entries[(slot, batch)]
        if e.tier != "disk":
            return e.tensor.to(device, non_blocking=self._pin).detach()
        mm = np.memmap(e.path, dtype=np.uint8, mode="r", shape=(max(e.nbytes, 1),))
        flat = torch.from_numpy(np.array(mm[: e.nbytes]))
        del mm
        return flat.view(e.dtype).reshape(e.shape).to(device)

    def has(self, slot, batch: int) -> bool:
        return (slot, batch) in self._entries

    def free(self, slot, batch: int) -> None:
        e = self._entries.pop((slot, batch), None)
        if e is None:
            return
        self.used[e.tier] -= e.nbytes
        if e.path is not None:
            try:
                os.remove(e.path)
            except OSError:
                pass

    def free_slot(self, slot, num_batches: int) -> None:
        for b in range(num_batches):
            self.free(slot, b)

    def close(self) -> None:
        for key in list(self._entries):
            self.free(*key)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def check_offload_dir(offload_dir, needed_bytes: int) -> str | None:
    """Validate ``offload_dir``: exists (created if missing), writable, with room for ``needed_bytes``."""
    if offload_dir is None:
        return None
    if not isinstance(offload_dir, (str, os.PathLike)):
        raise TypeError(f"offload_dir: expected a folder path, got {type(offload_dir).__name__}")
    path = os.fspath(offload_dir)
    try:
        os.makedirs(path, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".sglp-probe-", delete=True)
        probe.write(b"x")
        probe.flush()
        probe.close()
    except OSError as err:
        raise ValueError(
            f"offload_dir: {path!r} is not writable ({err.strerror or err}); pass a folder you can write to"
        ) from err
    free = shutil.disk_usage(path).free
    if needed_bytes > free:
        raise ValueError(
            f"offload_dir: {path!r} has {fmt_bytes(free)} free but the activation cache may need "
            f"{fmt_bytes(needed_bytes)} there; free space, pick a bigger disk, raise max_cpu_memory, or use "
            "fewer/shorter calibration batches"
        )
    return path
