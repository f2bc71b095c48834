"""Block weights on the compute device one block at a time: resident, copied per use, or read lazily.

Prefetch (``prefetch=True``): while block l computes, a background thread brings block l+1's weights
(``acquire(l, next_index=l + 1)``): read from the safetensors shards (``lazy``) or taken from host memory
(``copy``) and, on CUDA, copied to the device from pinned host memory on a side stream, so the disk read and
the host-to-device copy overlap the current block's kernels. The weights are the same bytes either way (the
same reads and conversions, only earlier), so results do not change; at most two blocks are materialized
(the current one and the next); an error in the reader is raised by the ``acquire`` that needed the block.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time

import torch
from torch import nn

from . import lazy_weights
from .devices import resolve_device

log = logging.getLogger(__name__)


def module_bytes(module: nn.Module, dtype: torch.dtype | None = None) -> int:
    total = 0
    for p in module.parameters():
        size = torch.tensor([], dtype=dtype).element_size() if dtype is not None and p.is_floating_point() else p.element_size()
        total += p.numel() * size
    return total


class _Fetch:
    """One block's weights being brought in by a background thread; ``result()`` waits and re-raises."""

    def __init__(self, index: int, fetch) -> None:
        self.index = index
        self._value = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fetch,), name=f"sglp-prefetch-block-{index}",
                                        daemon=True)
        self._thread.start()

    def _run(self, fetch) -> None:
        try:
            self._value = fetch(self.index)
        except BaseException as err:  # handed to the thread that needs the block
            self._error = err

    def result(self):
        self._thread.join()
        if self._error is not None:
            err, self._error = self._error, None
            if hasattr(err, "add_note"):  # Python >= 3.11: the traceback says where it happened
                err.add_note(f"(raised while prefetching block {self.index}'s weights in a background thread)")
            raise err
        value, self._value = self._value, None
        return value


class BlockWeights:
    """Brings one block's weights to the compute device and takes them away again.

    modes: ``resident`` (the block already lives on the device in the compute dtype: used as is),
    ``copy`` (a converted copy on the device per use: other device or dtype), ``lazy`` (read from the
    safetensors shards into the meta skeleton, sent back to meta after use). ``prefetch``: see the module
    docstring; None = on where it helps (``lazy`` anywhere, ``copy`` onto a GPU), never for ``resident``.
    """

    def __init__(self, adapter, device: torch.device, dtype: torch.dtype | None, prefetch: bool | None = None):
        self.adapter = adapter
        self.model = adapter.model
        self.device = resolve_device(device)
        self.dtype = dtype
        if lazy_weights.is_lazy(self.model):
            self.mode = "lazy"
        else:
            params = list(adapter.blocks.parameters())
            same_device = all(p.device == self.device for p in params)
            same_dtype = dtype is None or all(p.dtype == dtype for p in params if p.is_floating_point())
            self.mode = "resident" if same_device and same_dtype else "copy"
        if prefetch is None:
            prefetch = self.mode == "lazy" or (self.mode == "copy" and self.device.type == "cuda")
        self.prefetch = bool(prefetch) and self.mode != "resident"
        self._pending: _Fetch | None = None
        self._side_stream = None
        # the prefetch thread must use this device, not its own current one (cuda:0 by default)
        self._cuda_index = None
        if self.prefetch and self.device.type == "cuda":
            self._cuda_index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.loaded = 0  # blocks materialized or being read now (at most 2 with prefetch, 1 without)
        self.peak_loaded = 0
        self.wait_s = 0.0  # time the caller spent waiting for weights in acquire (what prefetch hides)

    # -- the public cycle: acquire (with the next block as a hint), release ------------------------------
    def acquire(self, index: int, next_index: int | None = None) -> nn.Module:
        """Block ``index`` on the device; with prefetch on, block ``next_index`` starts arriving meanwhile."""
        block = self.adapter.blocks[index]
        if self.mode == "resident":
            return block
        t0 = time.perf_counter()
        module = self._assemble(block, self._take(index))
        self.wait_s += time.perf_counter() - t0
        if self.prefetch and next_index is not None:
            self._count(+1)
            self._pending = _Fetch(next_index, self._fetch_side)
        return module

    def release(self, index: int, module: nn.Module) -> None:
        if self.mode == "resident":
            return
        if self.mode == "lazy":
            lazy_weights.unload_block(module)
        self._count(-1)
        del module

    def discard_prefetch(self) -> None:
        """Wait for and drop a prefetch nobody will take (after an error elsewhere): no thread outlives
        the pass, no third block accumulates. A failure of that read is logged, not raised (the error in
        flight is the one to report)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result()
        except Exception as err:  # noqa: BLE001  (secondary to the error being raised)
            log.debug("dropped prefetch of block %d failed: %s", pending.index, err)
        self._count(-1)

    # -- fetching: the same function inline or in the prefetch thread --------------------------------------
    def _take(self, index: int) -> dict[str, torch.Tensor]:
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                tensors, event = pending.result()
            except BaseException:
                self._count(-1)
                raise
            if pending.index == index:
                self._wait(tensors, event)
                return tensors
            del tensors, event  # another block was announced: drop it before reading this one
            self._count(-1)
        self._count(+1)
        return self._fetch(index, None)[0]

    def _fetch_side(self, index: int):
        """The prefetch thread's fetch: on CUDA, on the side stream of this object's device."""
        if self.device.type != "cuda":
            return self._fetch(index, None)
        with torch.cuda.device(self._cuda_index):
            if self._side_stream is None:
                self._side_stream = torch.cuda.Stream(device=self._cuda_index)
            return self._fetch(index, self._side_stream)

    def _fetch(self, index: int, stream) -> tuple[dict[str, torch.Tensor], object]:
        """Block ``index``'s parameters by name, on the compute device, and the CUDA event that marks their
        copy done on ``stream`` (None: copied on the current stream, nothing to wait for)."""
        block = self.adapter.blocks[index]
        cuda = self.device.type == "cuda"
        if self.mode == "lazy":
            host = lazy_weights.read_block(self.model, block, self.adapter.blocks_path, self.dtype, "cpu", pinned=cuda)
            dtype = self.dtype or lazy_weights.model_dtype(self.model)
        else:
            host = {n: p.detach() for n, p in block.named_parameters()}
            dtype = self.dtype
        if not cuda:  # lazy: already converted by the read; copy: a converted copy, as model.to would make
            return {n: self._convert(t, dtype, copy=self.mode == "copy") for n, t in host.items()}, None
        return self._to_cuda(host, dtype, stream)

    def _convert(self, t: torch.Tensor, dtype: torch.dtype | None, copy: bool = False) -> torch.Tensor:
        dtype = dtype if dtype is not None and t.is_floating_point() else t.dtype
        return t.to(self.device, dtype, copy=copy)

    def _to_cuda(self, host: dict[str, torch.Tensor], dtype, stream):
        """Host tensors -> device (pinned, non-blocking; converted on the device) on ``stream``."""
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx:
            out = {}
            for n, t in host.items():
                # host memory is pinned so that the copy is asynchronous (another GPU's tensors copy directly)
                src = t.pin_memory() if t.device.type == "cpu" and not t.is_pinned() else t
                out[n] = self._convert(src.to(self.device, non_blocking=True), dtype)
            event = None
            if stream is not None:
                event = torch.cuda.Event()
                event.record(stream)
        return out, event

    def _wait(self, tensors: dict[str, torch.Tensor], event) -> None:
        """Make the compute stream wait for the side stream's copy, and tell the allocator the tensors are
        used there (``record_stream``) so their memory is not reused before the compute stream is done."""
        if event is None:
            return
        current = torch.cuda.current_stream(self._cuda_index)
        current.wait_event(event)
        for t in tensors.values():
            t.record_stream(current)

    def _assemble(self, block: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
        if self.mode == "lazy":
            lazy_weights.assign_block(self.model, block, tensors)
            return block
        # parameters are the fetched device tensors (no second host copy of the block)
        memo = {id(p): nn.Parameter(tensors[n], requires_grad=False) for n, p in block.named_parameters()}
        clone = copy.deepcopy(block, memo)
        # buffers follow (floating ones into the compute dtype, as model.to(dtype) would)
        return clone.to(device=self.device, dtype=self.dtype) if self.dtype is not None else clone.to(self.device)

    def _count(self, delta: int) -> None:
        self.loaded += delta
        self.peak_loaded = max(self.peak_loaded, self.loaded)

    def block_bytes(self, index: int) -> int:
        return module_bytes(self.adapter.blocks[index], self.dtype)

    def describe(self) -> str:
        what = {
            "resident": "all blocks resident on the compute device (fast path)",
            "copy": "blocks copied to the compute device/dtype one at a time",
            "lazy": "blocks read one at a time from the safetensors shards (skeleton on meta)",
        }[self.mode]
        return what + (", the next one prefetched meanwhile" if self.prefetch else "")


class NonBlockModules:
    """The embedding, norms and head on the compute device and dtype while in use (restored on exit).

    Used for the embedding pass and the loss; a no-op when they already are there (the fast path).
    """

    def __init__(self, adapter, device: torch.device, dtype: torch.dtype | None):
        self.adapter = adapter
        self.device = device
        self.dtype = dtype
        self.moved: list = []

    def _target_dtype(self, t: torch.Tensor) -> torch.dtype:
        return self.dtype if (self.dtype is not None and t.is_floating_point()) else t.dtype

    def __enter__(self):
        blocks = self.adapter.blocks
        skip = {id(t) for t in blocks.parameters()} | {id(t) for t in blocks.buffers()}
        for module in self.adapter.model.modules():
            for store in (module._parameters, module._buffers):
                for name, t in list(store.items()):
                    if t is None or id(t) in skip or t.device.type == "meta":
                        continue
                    dtype = self._target_dtype(t)
                    if t.device == self.device and t.dtype == dtype:
                        continue
                    self.moved.append((store, name, t))
                    new = t.detach().to(self.device, dtype)
                    store[name] = torch.nn.Parameter(new, requires_grad=False) if isinstance(t, torch.nn.Parameter) else new
        return self

    def __exit__(self, *exc):
        for store, name, orig in reversed(self.moved):
            store[name] = orig
        self.moved.clear()
        return False
