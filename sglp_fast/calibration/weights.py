"""Block weights on the compute device one block at a time: resident, copied per use, or read lazily."""
from __future__ import annotations

import copy

import torch
from torch import nn

from . import lazy_weights


def module_bytes(module: nn.Module, dtype: torch.dtype | None = None) -> int:
    total = 0
    for p in module.parameters():
        size = torch.tensor([], dtype=dtype).element_size() if dtype is not None and p.is_floating_point() else p.element_size()
        total += p.numel() * size
    return total


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
            lazy_weights.load_block(self.model, block, self.adapter.blocks_path, self.device, self.dtype)
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
