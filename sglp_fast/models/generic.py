"""Generic mode, only on request: the largest ``nn.ModuleList`` whose children all share one class.

Block 0's call arguments are reused for every block (the blocks are assumed interchangeable), so this is
right for homogeneous stacks and wrong for models with per-layer attention types: use a named family
adapter for those.
"""
from __future__ import annotations

from torch import nn

from .base import BlockAdapter


def find_block_list(model: nn.Module) -> str:
    """Dotted path of the largest ModuleList of identical blocks (ties: the first in module order)."""
    best_path, best_len = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > best_len:
            classes = {type(child) for child in module}
            if len(classes) == 1:
                best_path, best_len = name, len(module)
    if best_path is None:
        raise ValueError(
            f"model: generic=True found no nn.ModuleList of identical blocks in {type(model).__name__}; "
            "this model has no layer stack that can be pruned block-wise"
        )
    return best_path


class GenericAdapter(BlockAdapter):
    family = "generic"
    per_layer_kwargs = False

    def __init__(self, model: nn.Module, blocks_path: str | None = None):
        path = blocks_path or find_block_list(model)
        name = type(model).__name__
        self.kind = "causal_lm" if ("CausalLM" in name or "LMHead" in name) else "encoder"
        super().__init__(model, path)
