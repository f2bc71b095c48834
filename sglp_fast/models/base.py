"""The adapter interface: where a model keeps its blocks and how to run one block at a time.

Why capture instead of re-implementing each family's forward: the model's own forward already builds the
attention mask (causal, sliding-window, bidirectional), the position ids and the rotary embeddings for
every block. We run that forward once per batch with every block swapped for a *catcher* that records the
arguments it was called with and passes the hidden state through. Calling ``block(h, *args, **kwargs)``
afterwards reproduces the full model's numbers exactly, for every family, whatever transformers version.
The same trick gives the head: run the forward again with the last catcher returning our hidden state,
and read ``.logits`` (final norm, soft-capping, projections included).
"""
from __future__ import annotations

import hashlib
import json
import operator
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

# names of per-layer lists in HF configs: sliced with the kept blocks on removal
PER_LAYER_CONFIG_LISTS = ("layer_types", "no_rope_layers", "block_types", "attention_types_per_layer")
# names of config lists that hold *indices* of layers: remapped on removal
LAYER_INDEX_CONFIG_LISTS = ("mlp_only_layers",)
# the batch keys a backbone forward understands (others are ignored)
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


class _StopForward(Exception):
    """Raised by the last catcher during capture: nothing after the blocks needs to run."""



# Config keys that say nothing about the architecture (paths, versions, load-time dtype/quantization).
_VOLATILE_CONFIG_KEYS = {"transformers_version", "dtype", "torch_dtype", "quantization_config", "use_cache",
                         "architectures", "output_hidden_states", "output_attentions", "return_dict"}


def config_fingerprint(config: Any) -> str:
    """Stable hash of a model config's architecture keys (not of the weights), to match a plan to a model."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    keep = {k: v for k, v in d.items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
    blob = json.dumps(keep, sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class BlockCall:
    """The positional (after the hidden state) and keyword arguments one block receives."""

    args: tuple
    kwargs: dict


class _Catcher(nn.Module):
    """Stands in for block ``index``: records its call, then passes the hidden state through."""

    def __init__(self, wrapped: nn.Module, index: int, on_call: Callable[[int, Any, tuple, dict], Any]):
        super().__init__()
        object.__setattr__(self, "_wrapped", wrapped)  # not registered: no parameters under the catcher
        self.index = index
        self._on_call = on_call

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_wrapped"), name)

    def forward(self, *args, **kwargs):
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        return self._on_call(self.index, hidden, rest, kwargs)


def resolve_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class BlockAdapter:
    """Knows one architecture family: its block list, its kind, its config fields, its call convention.

    Subclasses set ``family``, ``kind`` and ``blocks_path``; ``model_types`` lists the HF ``model_type``s.
    """

    family: str = "base"
    model_types: tuple[str, ...] = ()
    kind: str = "causal_lm"  # or "encoder"
    blocks_path: str = ""
    per_layer_kwargs: bool = True  # capture every block's call (False: block 0's call is reused for all)
    # the projection whose output a block adds straight to the residual stream (compensate.py); None: no such
    mlp_output: str | None = None
    block_returns_tuple: bool = False

    def __init__(self, model: nn.Module, blocks_path: str | None = None):
        self.model = model
        if blocks_path is not None:
            self.blocks_path = blocks_path
        blocks = resolve_path(model, self.blocks_path)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise ValueError(
                f"model: expected a non-empty nn.ModuleList at '{self.blocks_path}' for a {self.family} model, "
                f"got {type(blocks).__name__}; pass generic=True to search for the block list"
            )

    # --- structure -------------------------------------------------------------------------------------
    @property
    def config(self):
        return getattr(self.model, "config", None)

    @property
    def blocks(self) -> nn.ModuleList:
        return resolve_path(self.model, self.blocks_path)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_prefix(self, index: int) -> str:
        """State-dict prefix of block ``index`` (e.g. ``model.layers.3.``)."""
        return f"{self.blocks_path}.{index}."

    def check_window_length(self, seq_len: int, name: str = "seq_len") -> None:
        """Refuse windows longer than the model's positions (calibration, search and evaluation alike);
        ``name``: the setting that gave the length."""
        limit = self.max_positions()
        if limit is not None and seq_len > limit:
            raise ValueError(f"{name}: {seq_len} tokens per window exceed the {limit} positions this model "
                             f"supports (config max_position_embeddings); use {name} <= {limit}")

    def max_positions(self) -> int | None:
        """Longest sequence the model supports, or None when the architecture has no limit."""
        for name in ("max_position_embeddings", "n_positions"):
            value = getattr(self.config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def mlp_output_path(self) -> str | None:
        """Path (inside a block) of the MLP output projection compensation folds into; None: unsupported."""
        return self.mlp_output

    def has_lm_head(self) -> bool:
        """True when the model's output has token logits (causal LM head or masked-LM head)."""
        return self.kind == "causal_lm" or self._output_embeddings() is not None

    def _output_embeddings(self):
        get = getattr(self.model, "get_output_embeddings", None)
        return get() if callable(get) else None

    # --- calling the model around the blocks -----------------------------------------------------------
    def model_inputs(self, batch: dict) -> dict:
        inputs = {k: v for k, v in batch.items() if k in MODEL_INPUT_KEYS and v is not None}
        if self.kind == "causal_lm":
            inputs["use_cache"] = False
        return inputs

    def capture_block_calls(self, batch: dict) -> tuple[torch.Tensor, list[BlockCall]]:
        """Run the model's own forward up to the blocks: block 0's input and every block's arguments."""
        blocks = self.blocks
        n = len(blocks)
        calls: list[BlockCall | None] = [None] * n
        first_hidden: list[torch.Tensor] = []
        last = n - 1 if self.per_layer_kwargs else 0

        def on_call(index, hidden, args, kwargs):
            if index == 0:
                first_hidden.append(hidden)
            calls[index] = BlockCall(args, dict(kwargs))
            if index == last:
                raise _StopForward
            return (hidden,) if self.block_returns_tuple else hidden

        with _swapped_blocks(blocks, on_call):
            try:
                with torch.no_grad():
                    self.model(**self.model_inputs(batch))
            except _StopForward:
                pass
        if not first_hidden:
            raise RuntimeError(f"{type(self.model).__name__}.forward never called block 0 of '{self.blocks_path}'")
        if not self.per_layer_kwargs:
            calls = [calls[0]] * n
        missing = [i for i, c in enumerate(calls) if c is None]
        if missing:
            raise RuntimeError(f"{type(self.model).__name__}.forward skipped blocks {missing}")
        return first_hidden[0], calls  # type: ignore[return-value]

    def head_output(self, hidden: torch.Tensor, batch: dict):
        """The model's output when the last block returns ``hidden`` (grad flows into ``hidden``)."""
        blocks = self.blocks
        n = len(blocks)

        def on_call(index, h, args, kwargs):
            out = hidden if index == n - 1 else h
            return (out,) if self.block_returns_tuple else out

        with _swapped_blocks(blocks, on_call):
            return self.model(**self.model_inputs(batch))

    def call_block(self, block: nn.Module, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
        out = block(hidden, *call.args, **call.kwargs)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out

    # --- pruning ---------------------------------------------------------------------------------------
    def remove_blocks(self, indices: Sequence[int]) -> list[int]:
        """Drop blocks in place and fix the config so save_pretrained + from_pretrained round-trips.

        Returns the original indices of the kept blocks.
        """
        n = self.num_blocks
        drop = _validate_indices(indices, n)
        kept = [i for i in range(n) if i not in drop]
        blocks = self.blocks
        new_list = nn.ModuleList([blocks[i] for i in kept])
        parent_path, _, attr = self.blocks_path.rpartition(".")
        parent = resolve_path(self.model, parent_path) if parent_path else self.model
        setattr(parent, attr, new_list)
        for new_index, block in enumerate(new_list):
            for module in block.modules():
                if hasattr(module, "layer_idx") and not isinstance(getattr(module, "layer_idx"), nn.Module):
                    module.layer_idx = new_index
        self._fix_config(kept, n)
        return kept

    def _fix_config(self, kept: list[int], old_n: int) -> None:
        config = self.config
        if config is None:
            return
        configs = [config]
        text_config = getattr(config, "text_config", None)
        if text_config is not None and text_config is not config:
            configs.append(text_config)
        for cfg in configs:
            if getattr(cfg, "num_hidden_layers", None) == old_n:
                cfg.num_hidden_layers = len(kept)
            for name in PER_LAYER_CONFIG_LISTS:
                value = getattr(cfg, name, None)
                if isinstance(value, (list, tuple)) and len(value) == old_n:
                    setattr(cfg, name, type(value)(value[i] for i in kept))
            for name in LAYER_INDEX_CONFIG_LISTS:
                value = getattr(cfg, name, None)
                if isinstance(value, (list, tuple)):
                    setattr(cfg, name, [new for new, old in enumerate(kept) if old in set(value)])
            self._fix_family_config(cfg, kept, old_n)

    def _fix_family_config(self, cfg, kept: list[int], old_n: int) -> None:
        """Family-specific config fields (override)."""


def _validate_indices(indices: Sequence[int], n: int) -> set[int]:
    if isinstance(indices, (str, bytes)) or not hasattr(indices, "__iter__"):
        raise TypeError(f"indices: expected a sequence of block indices, got {type(indices).__name__}")
    drop = []
    for i in indices:
        try:
            if isinstance(i, bool):
                raise TypeError
            i = operator.index(i)
        except TypeError:
            raise TypeError(f"indices: expected integers, got {i!r} ({type(i).__name__})") from None
        if not 0 <= i < n:
            raise ValueError(f"indices: block {i} is out of range for a model with {n} blocks (valid: 0..{n - 1})")
        drop.append(i)
    if len(set(drop)) != len(drop):
        raise ValueError(f"indices: duplicates in {sorted(drop)}; pass each block once")
    if len(drop) >= n:
        raise ValueError(f"indices: removing all {n} blocks leaves no model; keep at least one block")
    return set(drop)


class _swapped_blocks:
    """Context manager: every block replaced by a catcher, restored on exit (even on error)."""

    def __init__(self, blocks: nn.ModuleList, on_call):
        self.blocks = blocks
        self.on_call = on_call
        self.saved: list[nn.Module] = []

    def __enter__(self):
        self.saved = list(self.blocks)
        for i, block in enumerate(self.saved):
            self.blocks[i] = _Catcher(block, i, self.on_call)
        return self

    def __exit__(self, *exc):
        for i, block in enumerate(self.saved):
            self.blocks[i] = block
        return False
