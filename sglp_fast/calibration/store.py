"""The tiered store: tensors keyed by (slot, batch) on the device, then (pinned) CPU memory, then disk.

One store serves both users of "keep this for later":
  calibration  every block's input, kept until the top-down backward reaches it (GradNorm), which is
               (L+1) x tokens x hidden bytes: more than a GPU holds for big models, sometimes more than RAM;
  similarity   each (layer, batch)'s centered Gram (or activations) until the batch's last layer arrives
               (the CKA accumulator's layer-major order), read back in row panels.

Placement is first fit, in the order tensors are written: each goes to the first tier with room under its
byte budget (device, then CPU, then disk), so the earliest tensors stay close and only the overflow pays for
the disk. CPU copies are pinned when computing on a GPU, so copies back overlap.
:meth:`TieredStore.for_policy` maps the accumulator's ``cache="auto"|"device"|"cpu"|"disk"`` options onto the budgets.

Disk format: one raw file per tensor, C order, the tensor's own dtype (bfloat16 as its int16 bits, numpy has
no bfloat16). Reads map the file with ``np.memmap`` at the offset of the requested rows only, copy them and
drop the mapping at once, so a panel read costs the panel, not the file.
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

TIERS = ("device", "cpu", "disk")
POLICIES = ("auto", "device", "cpu", "disk")

# numpy has no bfloat16: it travels through disk as its raw int16 bits (the one dtype numpy cannot hold)
_BITS_VIEW = {torch.bfloat16: torch.int16}


def release_pinned_host_memory() -> None:
    """Give torch's cached pinned host blocks back to the system. Why: torch's pinned-memory allocator keeps
    every freed block (rounded up to a power of two) for reuse and never returns it, so the CKA items' pinned
    tier would stay allocated through the search beside the kept inputs' own (tens of GiB at 70B)."""
    empty = getattr(torch._C, "_host_emptyCache", None)
    if empty is not None and torch.cuda.is_available():
        empty()


def free_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Memory free for new allocations now: a GPU's free memory (``cudaMemGetInfo``), else the host's
    MemAvailable from /proc/meminfo (Linux; page cache that can be dropped counts as free), falling back to
    the total physical memory elsewhere. The one free-memory probe of the package."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
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


class StoreFullError(ValueError):
    """No tier has room for a tensor and the disk tier is off: the caller names its own budget and fix."""


@dataclass
class _Entry:
    tier: str
    tensor: torch.Tensor | None = None  # device / cpu tiers
    path: str | None = None  # disk tier
    shape: tuple = ()
    dtype: torch.dtype = torch.float32
    nbytes: int = 0


def _write_raw(path: str, t: torch.Tensor) -> None:
    """``t`` as one raw C-order file in its own dtype (bf16 as int16 bits), written through a memmap."""
    src = t.detach().to("cpu").contiguous()
    bits = _BITS_VIEW.get(src.dtype)
    try:
        arr = (src.view(bits) if bits is not None else src).numpy().reshape(-1)
    except TypeError as err:  # e.g. float8 / complex32: numpy has no such dtype
        raise TypeError(f"tensor: dtype {src.dtype} cannot be stored on disk; cast it first") from err
    mm = np.memmap(path, dtype=arr.dtype, mode="w+", shape=arr.shape)
    mm[:] = arr
    mm.flush()
    del mm


def _read_raw(path: str, shape: tuple, dtype: torch.dtype, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) (first dimension) of a file written by :func:`_write_raw`, on the CPU."""
    bits = _BITS_VIEW.get(dtype)
    np_dtype = torch.empty((), dtype=bits or dtype).numpy().dtype
    row_len = int(np.prod(shape[1:], dtype=np.int64))
    out_shape = (stop - start, *shape[1:])
    if stop <= start or row_len == 0:
        return torch.empty(out_shape, dtype=dtype)
    mm = np.memmap(path, dtype=np_dtype, mode="r", offset=start * row_len * np_dtype.itemsize,
                   shape=out_shape)
    out = torch.from_numpy(np.array(mm))  # copy, then drop the mapping so its pages leave our RSS
    del mm
    return out.view(dtype) if bits is not None else out


class TieredStore:
    """Tensors keyed by (slot, batch) in the first tier with room: device, then CPU, then disk.

    ``device_budget`` / ``cpu_budget``: bytes each tier may hold (``None``: unbounded, 0: tier unused; the
    device tier is unused when computing on the CPU, where the CPU tier is the device). The disk tier takes
    the overflow when ``disk`` is true: files go in a private folder under ``offload_dir``, or under the
    system temp folder when ``system_temp`` (else a missing ``offload_dir`` is an error naming it). With
    ``disk=False`` an overflow raises :class:`StoreFullError`.

    ``used`` / ``peak``: bytes per tier now / at most. Reads (:meth:`get`, :meth:`rows`) return tensors on
    the compute device (or ``device=``); device-tier reads are the stored tensor itself: treat it read-only.
    """

    def __init__(self, device: torch.device | str, device_budget: int | None = 0, cpu_budget: int | None = 0,
                 offload_dir: str | os.PathLike | None = None, *, disk: bool = True,
                 system_temp: bool = False):
        self.device = torch.device(device)
        self.budgets = {"device": device_budget if self.device.type != "cpu" else 0, "cpu": cpu_budget}
        self.used = {tier: 0 for tier in TIERS}
        self.peak = {tier: 0 for tier in TIERS}
        self.offload_dir = offload_dir
        self.disk, self.system_temp = disk, system_temp
        self._dir: str | None = None
        self._entries: dict[tuple, _Entry] = {}
        self._files = 0
        self._pin = self.device.type == "cuda"
        self._pinned_given_back = False

    @classmethod
    def for_policy(cls, policy: str, device: torch.device | str, budget_bytes: int | None = None,
                   directory: str | os.PathLike | None = None, cpu_budget_bytes: int | None = None) -> "TieredStore":
        """The store for a placement policy (the CKA accumulator's ``cache=`` option):

        "device"  the compute device only, up to ``budget_bytes`` (None: unbounded);
        "cpu"     CPU memory only (pinned when computing on a GPU), up to ``budget_bytes``;
        "disk"    files only (in ``directory``, else the system temp folder);
        "auto"    the compute device up to ``budget_bytes`` (default: half its free memory), then (GPU only)
                  pinned CPU memory up to ``cpu_budget_bytes`` (default: half the free RAM), then disk.
        Overflowing "device" or "cpu" raises :class:`StoreFullError`.
        """
        device = torch.device(device)
        on_cpu = device.type == "cpu"
        if policy == "device":
            dev, cpu = (0, budget_bytes) if on_cpu else (budget_bytes, 0)
            disk = False
        elif policy == "cpu":
            dev, cpu, disk = 0, budget_bytes, False
        elif policy == "disk":
            dev, cpu, disk = 0, 0, True
        elif policy == "auto":
            first = budget_bytes if budget_bytes is not None else free_memory_bytes(device) // 2
            if on_cpu:
                dev, cpu = 0, first
            else:
                dev = first
                cpu = cpu_budget_bytes if cpu_budget_bytes is not None else free_memory_bytes("cpu") // 2
            disk = True
        else:
            raise ValueError(f"policy: expected one of {POLICIES}, got {policy!r}")
        return cls(device, dev, cpu, directory, disk=disk, system_temp=True)

    # -- placement -----------------------------------------------------------------------------------------
    def _fits(self, tier: str, nbytes: int) -> bool:
        budget = self.budgets[tier]
        if budget == 0:
            return False
        return budget is None or self.used[tier] + nbytes <= budget

    def _disk_dir(self) -> str:
        if self._dir is None:
            if self.offload_dir is None and not self.system_temp:
                raise ValueError(
                    "offload_dir: the activation cache exceeds max_device_memory + max_cpu_memory and no "
                    "offload_dir was given; pass offload_dir=<a folder on a disk with room> or raise the "
                    "budgets"
                )
            if self.offload_dir is not None:
                os.makedirs(self.offload_dir, exist_ok=True)
            self._dir = tempfile.mkdtemp(prefix=f"sglp-cache-{uuid.uuid4().hex[:8]}-", dir=self.offload_dir)
        return self._dir

    def put(self, slot, batch, t: torch.Tensor, *, owned: bool = False) -> None:
        """Store ``t`` under (slot, batch), replacing what was there.

        ``owned``: the caller hands ``t`` over and will not write to it again, so a tensor already on the
        compute device is kept as is (no copy). CPU tensors are kept without a copy whenever no pinning is
        needed (fresh outputs cost nothing to keep).
        """
        self.free(slot, batch)
        t = t.detach()
        nbytes = tensor_bytes(t)
        if nbytes == 0:  # nothing to budget: keep the (empty) tensor itself
            self._add(slot, batch, _Entry("cpu", tensor=t.to("cpu"), shape=tuple(t.shape), dtype=t.dtype))
            return
        for tier in ("device", "cpu"):
            if not self._fits(tier, nbytes):
                continue
            if tier == "device":
                stored = t.to(self.device) if (owned or t.device != self.device) \
                    else t.to(self.device, copy=True)
            elif t.device.type == "cpu" and not self._pin:
                stored = t
            else:
                stored = torch.empty(t.shape, dtype=t.dtype, pin_memory=self._pin)
                stored.copy_(t)
            self._add(slot, batch, _Entry(tier, tensor=stored, shape=tuple(t.shape), dtype=t.dtype,
                                          nbytes=nbytes))
            return
        if not self.disk:
            raise StoreFullError(
                f"store: ({slot!r}, {batch!r}) needs {nbytes} more bytes but the budgets are full (used "
                f"{self.used['device']} of {self.budgets['device']} on the device, {self.used['cpu']} of "
                f"{self.budgets['cpu']} in CPU memory) and the disk tier is off"
            )
        self._files += 1
        path = os.path.join(self._disk_dir(), f"{self._files}.bin")
        try:
            _write_raw(path, t)
        except OSError as err:
            try:
                os.remove(path)
            except OSError:
                pass
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

    # -- reads -----------------------------------------------------------------------------------------------
    def get(self, slot, batch, device=None) -> torch.Tensor:
        """The stored tensor on ``device`` (the compute device by default). Read-only for device tiers."""
        e = self._entries[(slot, batch)]
        return self.rows(slot, batch, 0, e.shape[0] if e.shape else None, device=device)

    def rows(self, slot, batch, start: int, stop: int | None, device=None) -> torch.Tensor:
        """Rows [start, stop) (first dimension) of a stored tensor, on ``device`` (default: compute device).

        Disk entries read only those rows from the file. ``stop=None`` on a 0-d tensor reads the scalar.
        """
        device = self.device if device is None else torch.device(device)
        e = self._entries[(slot, batch)]
        if stop is not None and not 0 <= start <= stop <= e.shape[0]:
            raise IndexError(f"rows: [{start}, {stop}) is outside the {e.shape[0]} rows of "
                             f"({slot!r}, {batch!r})")
        if e.tier != "disk":
            src = e.tensor if stop is None else e.tensor[start:stop]
            return src.to(device, non_blocking=self._pin).detach()
        if stop is None:  # 0-d
            return _read_raw(e.path, (1,), e.dtype, 0, 1).reshape(()).to(device)
        return _read_raw(e.path, e.shape, e.dtype, start, stop).to(device)

    def has(self, slot, batch) -> bool:
        return (slot, batch) in self._entries

    def tier(self, slot, batch) -> str:
        """Where (slot, batch) lives: "device", "cpu" or "disk"."""
        return self._entries[(slot, batch)].tier

    @property
    def bytes_in_memory(self) -> int:
        """Bytes held on the device and in CPU memory."""
        return self.used["device"] + self.used["cpu"]

    @property
    def bytes_on_disk(self) -> int:
        return self.used["disk"]

    # -- freeing ---------------------------------------------------------------------------------------------
    def free(self, slot, batch) -> None:
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
        """Free every entry and remove the store's folder (idempotent); a GPU run's pinned CPU tier goes back
        to the system (``release_pinned_host_memory``)."""
        for key in list(self._entries):
            self.free(*key)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        if self._pin and self.peak["cpu"] > 0 and not self._pinned_given_back:
            self._pinned_given_back = True  # (the peak stays the record it is)
            release_pinned_host_memory()

    def __enter__(self) -> "TieredStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # best effort: temporary files never outlive the store
        try:
            self.close()
        except Exception:
            pass


def check_offload_dir(offload_dir, needed_bytes: int) -> str | None:
    """Validate ``offload_dir``: exists (created if missing), writable, with room for ``needed_bytes``."""
    if offload_dir is None:
        return None
    if not isinstance(offload_dir, (str, os.PathLike)):
        raise TypeError(f"offload_dir: expected a folder path, got {type(offload_dir).__name__}")
    path = os.fspath(offload_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"offload_dir: {path!r} is a file, not a folder; pass a folder (it is created if missing)")
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
