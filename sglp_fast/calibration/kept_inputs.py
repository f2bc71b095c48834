"""The handle calibration returns when asked to keep block inputs: re-run any block from the dense model's input.

Why a handle and not the search's object: calibration knows nothing of how blocks are selected. A later stage
(the verified search, the compensation fit) needs to run block l on the dense model's input of block l for a
few windows; the calibration pass already computed those inputs, so it hands over the store that holds them,
the block weights (resident, copied or lazy, each brought to the device only while in use), every kept
batch's block-call arguments (masks, positions, rotary tables) and the batches themselves. The handle owns the
store: close it (``close()`` or ``with``) to free the memory and the offload files.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from . import losses
from .weights import NonBlockModules


class KeptInputs:
    """The dense input of every block (slot ``l``; slot ``num_blocks`` = the last block's output) per kept batch."""

    def __init__(self, *, adapter: Any, weights: Any, store: Any, calls: list, batches: list[dict], loss_kind: str,
                 device: torch.device, total_windows: int) -> None:
        self.adapter = adapter
        self.num_blocks: int = adapter.num_blocks
        self.loss_kind = loss_kind
        self.device = device
        self.batches = batches              # the kept batches, on the device
        self.total_windows = total_windows  # windows of the whole calibration set (kept or not)
        self.windows = [int(b["input_ids"].shape[0]) for b in batches]  # windows per kept batch
        self._weights = weights
        self._store = store
        self._calls = calls                 # calls[b][l]: block l's call arguments for kept batch b
        self.closed = False

    @property
    def num_batches(self) -> int:
        return len(self.batches)

    def block_input(self, layer: int, batch: int) -> torch.Tensor:
        """The dense model's input of block ``layer`` for kept batch ``batch`` (``num_blocks``: the output)."""
        self._check_open()
        return self._store.get(layer, batch)

    def token_mask(self, batch: int) -> torch.Tensor:
        return losses.token_mask(self.batches[batch])

    @contextlib.contextmanager
    def block(self, layer: int, next_layer: int | None = None) -> Iterator[nn.Module]:
        """Block ``layer`` on the compute device while in use (released after); ``next_layer``: the block the
        caller reads next, brought in meanwhile when the weights prefetch (lazy or copied weights)."""
        self._check_open()
        block = self._weights.acquire(layer, next_layer)
        try:
            yield block
        finally:
            self._weights.release(layer, block)

    def call(self, block: nn.Module, layer: int, hidden: torch.Tensor, batch: int) -> torch.Tensor:
        """Run ``block`` (acquired for ``layer``) on ``hidden`` with kept batch ``batch``'s call arguments."""
        return self.adapter.call_block(block, hidden, self._calls[batch][layer])

    def non_block_modules(self) -> NonBlockModules:
        """Context manager: the embedding, norms and head on the compute device while in use."""
        return NonBlockModules(self.adapter, self.device, self._weights.dtype)

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("kept_inputs: closed (the cached block inputs are gone); calibrate again with "
                             "keep_inputs=... to re-run blocks")

    def close(self) -> None:
        if not self.closed:
            self._weights.discard_prefetch()  # a read-ahead nobody took (the search stopped early)
            self._store.close()
            self.closed = True

    def __enter__(self) -> KeptInputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
