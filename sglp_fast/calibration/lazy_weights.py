"""Per-block weight loading from safetensors shards into a skeleton whose parameters live on ``meta``.

Why: a 70B checkpoint does not fit in RAM; the calibration runtime needs one block at a time. The skeleton
is built with real buffers (rotary ``inv_freq`` etc. are computed, not stored) and meta parameters; the
embedding, final norm and head are loaded eagerly, each block on demand. Shards are opened per block and
closed right after, so their memory-mapped pages leave the resident set with the block. Reading a block
(``read_block``, safe in a background thread: it touches no module) is apart from putting it into the
skeleton (``assign_block``, the calling thread's), so the next block can be read while the current computes.
"""
from __future__ import annotations

import json
import os
import threading
import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

INDEX_NAME = "model.safetensors.index.json"


class SafetensorsCheckpoint:
    """Which shard holds which tensor, and reading a set of tensors with one open per shard."""

    def __init__(self, directory: str):
        self.directory = directory
        self.bytes_read = 0  # tensor bytes read from disk so far (the scale benchmark reports it per stage)
        self._count_lock = threading.Lock()  # a prefetch thread reads while the main thread may too
        index = os.path.join(directory, INDEX_NAME)
        if os.path.isfile(index):
            self.weight_map: dict[str, str] = _read_index(index)
        else:
            files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
            if not files:
                raise ValueError(
                    f"source: lazy loading needs *.safetensors weights in {directory!r}, found none; "
                    "save the model with save_pretrained(safe_serialization=True) or pass lazy=False"
                )
            self.weight_map = {}
            for name in files:
                path = os.path.join(directory, name)
                with open(path, "rb") as fh:
                    self.weight_map.update({k: name for k in _read_header(fh, path)[0]})

    def read(self, keys: list[str], dtype: torch.dtype | None, device="cpu") -> dict[str, torch.Tensor]:
        """Read ``keys`` with plain file reads (no mmap: the resident set holds exactly these tensors)."""
        out = {}
        for key, t in self._each(keys, pin=False):
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            out[key] = t.to(device)
        return out

    def read_pinned(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Read ``keys`` as stored, straight into pinned host memory: a copy to a GPU can then run
        asynchronously on a side stream with no staging copy (the dtype is converted on the GPU)."""
        return dict(self._each(keys, pin=True))

    def _each(self, keys: list[str], pin: bool):
        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.weight_map[key], []).append(key)
        for name, file_keys in by_file.items():
            path = os.path.join(self.directory, name)
            with open(path, "rb", buffering=0) as fh:
                header, data_start = _read_header(fh, path)
                for key in sorted(file_keys, key=lambda k: header[k]["data_offsets"][0]):
                    t = _read_tensor(fh, header[key], data_start, key, path, pin)
                    with self._count_lock:
                        self.bytes_read += t.numel() * t.element_size()
                    yield key, t


def _read_index(index: str) -> dict[str, str]:
    """The index's ``weight_map``, each shard a plain file name inside the model folder (no path tricks)."""
    try:
        with open(index, encoding="utf-8") as fh:
            weight_map = json.load(fh)["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"source: {index} is not a safetensors index with a 'weight_map' ({type(e).__name__}: "
                         f"{e}); the file is corrupted: re-save the model or remove the index") from None
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise ValueError(f"source: {index} maps {key!r} to {shard!r}, which is not a file name inside the model "
                             "folder; refusing to read outside it: fix or re-save the index")
    return dict(weight_map)


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
              "F8_E5M2": getattr(torch, "float8_e5m2", None)}


def _read_header(fh, path: str) -> tuple[dict, int]:
    """The safetensors header: 8-byte little-endian length, then JSON {name: {dtype, shape, data_offsets}}."""
    raw = fh.read(8)
    if len(raw) != 8:
        raise ValueError(f"source: {path!r} is not a safetensors file (truncated header)")
    n = int.from_bytes(raw, "little")
    header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def _read_tensor(fh, info: dict, data_start: int, key: str, path: str, pin: bool = False) -> torch.Tensor:
    dtype = _ST_DTYPES.get(info["dtype"])
    if dtype is None:
        raise ValueError(f"source: tensor {key!r} in {path!r} has dtype {info['dtype']}, which lazy loading does not read")
    begin, end = info["data_offsets"]
    buf = torch.empty(end - begin, dtype=torch.uint8, pin_memory=pin)
    fh.seek(data_start + begin)
    view = memoryview(buf.numpy())
    got = 0
    while got < len(view):
        n = fh.readinto(view[got:])
        if not n:
            raise ValueError(f"source: {path!r} ends before tensor {key!r} does (truncated file)")
        got += n
    return buf.view(dtype).reshape(info["shape"])


@dataclass
class LazyWeights:
    """Where each parameter of a lazily built model lives, and which checkpoint block each block module is.

    Kept in ``_LAZY_MODELS`` (keyed weakly by the model this module built), not as attributes on the model:
    the block modules keep their identity when blocks are removed, so the original index follows them.
    """

    checkpoint: SafetensorsCheckpoint
    key_map: dict[str, str]  # model parameter name (original block numbering) -> checkpoint key
    dtype: torch.dtype
    original_index: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)  # block -> i
    # block -> what to do to it right after each load (compensation folds its map in: a pruned lazy model
    # never holds its weights, so the fold happens whenever the block is read)
    after_load: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)


# the models build_lazy_model made -> their lazy weights (weak: a model that is dropped leaves no trace)
_LAZY_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _checkpoint_key(name: str, keys: set[str], prefix: str) -> str | None:
    for cand in (name, name[len(prefix) + 1 :] if prefix and name.startswith(prefix + ".") else None,
                 f"{prefix}.{name}" if prefix else None):
        if cand is not None and cand in keys:
            return cand
    return None


def _set_meta(module: nn.Module) -> None:
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.device.type != "meta":
                sub._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


def _assign(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_path, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)


def build_lazy_model(directory: str, auto_class, dtype: torch.dtype, blocks_path_of) -> nn.Module:
    """Meta skeleton + eagerly loaded non-block parameters; blocks load through ``load_block``."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    checkpoint = SafetensorsCheckpoint(directory)
    config = AutoConfig.from_pretrained(directory)
    with init_empty_weights(include_buffers=False):
        model = auto_class.from_config(config)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    _set_meta(model)
    prefix = getattr(model, "base_model_prefix", "")
    keys = set(checkpoint.weight_map)
    key_map: dict[str, str] = {}
    missing = []
    for name, p in model.named_parameters(remove_duplicate=False):
        ck = _checkpoint_key(name, keys, prefix)
        if ck is None:
            missing.append(name)
        else:
            key_map[name] = ck
    blocks_path = blocks_path_of(model)
    block_missing = [m for m in missing if m.startswith(blocks_path + ".")]
    if block_missing:
        raise ValueError(
            f"source: {directory!r} has no tensor for block parameters {block_missing[:3]}...; the checkpoint "
            "names do not match this transformers version's modules: pass lazy=False"
        )
    eager = [n for n in key_map if not n.startswith(blocks_path + ".")]
    tensors = checkpoint.read([key_map[n] for n in eager], dtype)
    for n in eager:
        _assign(model, n, tensors[key_map[n]])
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    _init_missing(model, blocks_path, directory)
    lazy = LazyWeights(checkpoint, key_map, dtype)
    for i, block in enumerate(model.get_submodule(blocks_path)):
        lazy.original_index[block] = i
    _LAZY_MODELS[model] = lazy
    return model


def _init_missing(model: nn.Module, blocks_path: str, directory: str) -> None:
    """Non-block parameters absent from the checkpoint (e.g. an unused pooler): initialized the way
    ``from_pretrained`` does it, with the same kind of warning."""
    owners = {}
    for name, p in model.named_parameters():
        if p.device.type == "meta" and not name.startswith(blocks_path + "."):
            owner_path = name.rpartition(".")[0]
            owners[owner_path] = model.get_submodule(owner_path) if owner_path else model
    if not owners:
        return
    init = getattr(model, "_init_weights", None)
    for module in owners.values():
        module.to_empty(device="cpu", recurse=False)
        if callable(init):
            init(module)
        for p in module.parameters(recurse=False):
            p.requires_grad_(False)
    warnings.warn(
        f"{directory}: no checkpoint tensors for {sorted(owners)}; newly initialized (as from_pretrained does)",
        stacklevel=3,
    )


def bytes_read(model: nn.Module) -> int:
    """Tensor bytes a lazily built model has read from its checkpoint so far (0 for other models)."""
    lazy = _LAZY_MODELS.get(model)
    return 0 if lazy is None else lazy.checkpoint.bytes_read


def is_lazy(model: nn.Module) -> bool:
    """True for a model ``build_lazy_model`` made whose blocks still live on disk."""
    return model in _LAZY_MODELS


def changes_at_load(model: nn.Module) -> int:
    """How many of the lazy ``model``'s blocks are changed each time they are read (``on_load``: a folded
    compensation map); 0 for any other model. The memory plan counts the change's work (``memory._phases``)."""
    lazy = _LAZY_MODELS.get(model)
    return 0 if lazy is None else len(lazy.after_load)


def block_keys(model: nn.Module, block: nn.Module, blocks_path: str) -> dict[str, str]:
    """``block``'s parameter names -> their checkpoint keys (the block's original numbering)."""
    lazy = _LAZY_MODELS[model]
    original_prefix = f"{blocks_path}.{lazy.original_index[block]}."
    return {n: lazy.key_map[original_prefix + n] for n, _ in block.named_parameters()}


def read_block(model: nn.Module, block: nn.Module, blocks_path: str, dtype: torch.dtype | None, device="cpu",
               pinned: bool = False) -> dict[str, torch.Tensor]:
    """``block``'s tensors by parameter name, read from the checkpoint; touches no module.

    Why apart from ``assign_block``: a prefetch thread reads the next block while the current one computes;
    only the main thread changes modules. ``pinned``: as stored, in pinned host memory (``dtype`` and
    ``device`` unused: the caller copies them to its GPU and converts there).
    """
    lazy = _LAZY_MODELS[model]
    keys = block_keys(model, block, blocks_path)
    if pinned:
        tensors = lazy.checkpoint.read_pinned(list(keys.values()))
    else:
        tensors = lazy.checkpoint.read(list(keys.values()), dtype or lazy.dtype, device)
    return {n: tensors[k] for n, k in keys.items()}


def assign_block(model: nn.Module, block: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put ``read_block``'s tensors into ``block`` and run its after-load change (e.g. a folded map)."""
    for n, t in tensors.items():
        _assign(block, n, t)
    lazy = _LAZY_MODELS[model]
    if block in lazy.after_load:
        lazy.after_load[block](block)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a lazy model's floating tensors are read in unless the caller asks for another."""
    return _LAZY_MODELS[model].dtype


def load_block(model: nn.Module, block: nn.Module, blocks_path: str, device, dtype: torch.dtype | None) -> None:
    """Materialize ``block``'s parameters (on ``device``) from its checkpoint entries (original numbering)."""
    assign_block(model, block, read_block(model, block, blocks_path, dtype, device))


def on_load(model: nn.Module, block: nn.Module, change) -> None:
    """Apply ``change(block)`` each time ``block`` of the lazy ``model`` is read (e.g. fold a map in)."""
    _LAZY_MODELS[model].after_load[block] = change


def unload_block(block: nn.Module) -> None:
    """Send the block's parameters back to ``meta`` (frees their memory)."""
    _set_meta(block)
    release_freed_host_memory()


def _load_malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_freed_host_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``).

    Why: block-sized buffers are allocated and freed once per block; glibc raises its mmap threshold after
    the first frees and then serves them from the heap, where freed pages stay resident. Without this the
    peak RSS of a streamed run creeps up with depth although only one block is alive at a time.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def materialize(model: nn.Module, adapter) -> nn.Module:
    """Load every block to CPU (e.g. before ``save_pretrained`` of a pruned lazy model)."""
    if not is_lazy(model):
        return model
    for block in adapter.blocks:
        load_block(model, block, adapter.blocks_path, "cpu", None)
    del _LAZY_MODELS[model]
    return model
