"""Model adapters: find the block list, call one block, re-index after pruning; and model loading.

``get_adapter(model)`` picks the family by ``config.model_type``; ``generic=True`` opts into the
"largest ModuleList of identical blocks" fallback for anything else.
"""
from __future__ import annotations

from torch import nn

from .base import BlockAdapter, BlockCall
from .bert import BertAdapter
from .generic import GenericAdapter
from .gpt2 import GPT2Adapter
from .gpt_neox import GPTNeoXAdapter
from .llama import LlamaFamilyAdapter
from .loading import load_model
from .opt import OPTAdapter

_FAMILIES: tuple[type[BlockAdapter], ...] = (LlamaFamilyAdapter, GPT2Adapter, GPTNeoXAdapter, OPTAdapter, BertAdapter)
_BY_MODEL_TYPE = {mt: cls for cls in _FAMILIES for mt in cls.model_types}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(sorted(_BY_MODEL_TYPE))

__all__ = ["BlockAdapter", "BlockCall", "SUPPORTED_ARCHITECTURES", "get_adapter", "load_model"]


def get_adapter(model, generic: bool = False) -> BlockAdapter:
    """The adapter for ``model`` (an adapter passes through unchanged)."""
    if isinstance(model, BlockAdapter):
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch nn.Module (e.g. a transformers model), got {type(model).__name__}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cls = _BY_MODEL_TYPE.get(model_type)
    if cls is not None:
        try:
            return cls(model)
        except AttributeError as err:
            if not generic:
                raise ValueError(
                    f"model: a '{model_type}' model without the expected '{cls.blocks_path}' layout "
                    f"({type(model).__name__}); pass generic=True to search for the block list"
                ) from err
    if generic:
        return GenericAdapter(model)
    raise ValueError(
        f"model: unsupported architecture {model_type!r} ({type(model).__name__}); supported model_types: "
        f"{', '.join(SUPPORTED_ARCHITECTURES)}. Pass generic=True to use the largest ModuleList of "
        "identical blocks (all blocks then get block 0's call arguments)"
    )
