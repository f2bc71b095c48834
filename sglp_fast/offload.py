"""Where calibration keeps things: block weights (resident / streamed from CPU / lazy from safetensors) and
the activation cache (device -> pinned CPU -> disk memmap), under byte budgets.

Why tiers: GradNorm needs every block's input kept until the top-down backward reaches it, which is
(L+1) x tokens x hidden bytes: more than a GPU holds for big models, sometimes more than RAM. Each tensor
goes to the first tier with room (first fit, in the order it is written), so the lower blocks' inputs stay
close and only the overflow pays for the disk.
"""
from __future__ import annotations

import copy
import errno
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from . import lazy_weights

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


def module_bytes(module: nn.Module, dtype: torch.dtype | None = None) -> int:
    total = 0
    for p in module.parameters():
        size = torch.tensor([], dtype=dtype).element_size() if dtype is not None and p.is_floating_point() else p.element_size()
        total += p.numel() * size
    return total


# --- activation cache -----------------------------------------------------------------------------------
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


# --- block weights ---------------------------------------------------------------------------------------
class BlockWeights:
    """Brings one block's weights to the compute device and takes them away again.

    modes: ``resident`` (the block already lives on the device in the compute dtype: used as is),
    ``copy`` (a converted copy on the device per use: other device or dtype), ``lazy`` (read from the
    safetensors shards into the meta skeleton, sent back to meta after use).
    """

    def __init__(self, adapter, device: torch.device, dtype: torch.dtype | None):
        self.adapter = adapter
        self.model = adapter.model
        self.device = torch.device(device)
        self.dtype = dtype
        if lazy_weights.is_lazy(self.model):
            self.mode = "lazy"
        else:
            params = list(adapter.blocks.parameters())
            same_device = all(p.device == self.device for p in params)
            same_dtype = dtype is None or all(p.dtype == dtype for p in params if p.is_floating_point())
            self.mode = "resident" if same_device and same_dtype else "copy"

    def acquire(self, index: int) -> nn.Module:
        block = self.adapter.blocks[index]
        if self.mode == "resident":
            return block
        if self.mode == "lazy":
            origin = getattr(self.model, "_sglp_block_origin", None)
            orig = origin[index] if origin is not None else index
            lazy_weights.load_block(self.model, block, self.adapter.block_prefix(orig), self.device, self.dtype)
            return block
        # parameters are converted straight onto the device (no second host copy of the block)
        memo = {id(p): nn.Parameter(self._convert(p), requires_grad=False) for p in block.parameters()}
        clone = copy.deepcopy(block, memo)
        # buffers follow (floating ones into the compute dtype, as model.to(dtype) would)
        return clone.to(device=self.device, dtype=self.dtype) if self.dtype is not None else clone.to(self.device)

    def _convert(self, t: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype if self.dtype is not None and t.is_floating_point() else t.dtype
        return t.detach().to(self.device, dtype, copy=True)

    def release(self, index: int, module: nn.Module) -> None:
        if self.mode == "lazy":
            lazy_weights.unload_block(module)
        del module

    def block_bytes(self, index: int) -> int:
        return module_bytes(self.adapter.blocks[index], self.dtype)

    def describe(self) -> str:
        return {
            "resident": "all blocks resident on the compute device (fast path)",
            "copy": "blocks copied to the compute device/dtype one at a time",
            "lazy": "blocks read one at a time from the safetensors shards (skeleton on meta)",
        }[self.mode]


@dataclass
class MemoryPlan:
    """What goes where, in bytes; ``str()`` is the table printed before calibration."""

    device: str
    weights_mode: str
    max_block_bytes: int
    other_weight_bytes: int
    activation_slot_bytes: int
    num_slots: int
    grad_bytes: int
    tiers: dict[str, int] = field(default_factory=dict)  # projected bytes per tier
    budgets: dict[str, int | None] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [
            f"memory plan (compute device: {self.device})",
            f"  weights      : {self.weights_mode}",
            f"    largest block       {fmt_bytes(self.max_block_bytes):>12}",
            f"    embedding/head/norm {fmt_bytes(self.other_weight_bytes):>12}",
            f"  activations  : {self.num_slots} slot(s) x {fmt_bytes(self.activation_slot_bytes)}"
            f" + gradients {fmt_bytes(self.grad_bytes)}",
        ]
        for tier in ("device", "cpu", "disk"):
            if tier == "device" and self.device == "cpu":
                continue  # computing on the CPU: the CPU tier is the device
            budget = self.budgets.get(tier)
            b = "unbounded" if budget is None else fmt_bytes(budget)
            lines.append(f"    {tier:<6} {fmt_bytes(self.tiers.get(tier, 0)):>12}  (budget {b})")
        return "\n".join(lines)


def project_tiers(total: int, budgets: dict[str, int]) -> dict[str, int]:
    """First-fit projection of ``total`` cache bytes over device -> cpu -> disk."""
    out, left = {}, total
    for tier in ("device", "cpu"):
        take = min(left, budgets.get(tier, 0))
        out[tier] = take
        left -= take
    out["disk"] = left
    return out
