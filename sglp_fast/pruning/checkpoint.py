"""Prune a checkpoint too big to load: stream the safetensors shards, kept blocks only, renamed.

It copies only the kept blocks' tensors, renamed to their new indices, one tensor at a time (folding the
compensation maps into the tensors they change), and fixes the config through the model adapter applied to
a weightless (meta-device) skeleton.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..models import get_adapter
from ..plan import Plan
from ..selection.compensation import fold_state_tensor, mlp_output_module, module_kind
from ..similarity.heatmap import save_cka_heatmap
from .save import commit_dir, temporary_sibling, heatmap_title, check_output_dir

def _block_key_regex(blocks_path: str, keys: list[str]) -> re.Pattern:
    """The pattern of block tensor names in a checkpoint (with or without the base-model prefix)."""
    candidates = [blocks_path]
    if "." in blocks_path:
        candidates.append(blocks_path.split(".", 1)[1])
    for prefix in candidates:
        pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
        if any(pattern.match(k) for k in keys):
            return pattern
    raise ValueError(f"checkpoint: no tensor names under '{blocks_path}.<i>.'; not a checkpoint of this "
                     "architecture")


def _write_generation_config(src: Path, skeleton: Any, tmp: Path) -> None:
    """The source's generation_config.json, or (as ``save_pretrained`` does for a generative model) the one
    derived from its config, so --lazy and the in-memory save write the same files."""
    if (src / "generation_config.json").is_file():
        shutil.copy2(src / "generation_config.json", tmp / "generation_config.json")
        return
    from transformers import GenerationConfig  # noqa: PLC0415 (heavy)

    can_generate = getattr(skeleton, "can_generate", None)
    if callable(can_generate) and can_generate():
        # from the config file as written (from_pretrained derives it so; the config object fills in defaults)
        with open(src / "config.json", encoding="utf-8") as f:
            GenerationConfig.from_model_config(json.load(f)).save_pretrained(tmp)


def prune_checkpoint(src_dir: str | os.PathLike, plan: Plan, output_dir: str | os.PathLike,
                     overwrite: bool = False, max_shard_bytes: int = 2 * 1024**3,
                     stats: dict[str, int] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Prune a safetensors checkpoint on disk without loading the model: kept tensors only, renamed.

    ``dtype``: floating-point tensors are written in it (the run's compute dtype, as the in-memory save writes
    the loaded model; the maps are folded in float64 and rounded once, to it); None keeps the checkpoint's own.
    ``stats`` (a dict) receives ``bytes_read`` and ``bytes_written`` (tensor bytes).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415 (heavy)

    if plan.removed is None:
        raise ValueError("plan: has no 'removed' blocks; it cannot be applied")
    src = Path(src_dir)
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"src_dir: {str(src)!r} holds no .safetensors files; prune_checkpoint needs a "
                         "safetensors checkpoint (load smaller models and use save_pruned instead)")
    out = check_output_dir(output_dir, overwrite)
    config = AutoConfig.from_pretrained(src)
    auto = AutoModelForCausalLM
    if "ForMaskedLM" in "".join(getattr(config, "architectures", None) or []) or not (
            getattr(config, "architectures", None)):
        auto = AutoModel
    with torch.device("meta"):
        skeleton = auto.from_config(config)
    plan.check_model(skeleton)
    adapter = get_adapter(skeleton)
    blocks_path = adapter.blocks_path
    folds: dict[tuple[int, str], tuple[str, Any]] = {}  # (block, tensor name in block) -> (kind, T)
    if plan.extra.get("compensation") is not None:
        if plan.transforms is None:
            raise ValueError("plan: compensates removed blocks but carries no maps; load it with Plan.load")
        path = adapter.mlp_output_path()
        for blk, T in plan.transforms.items():
            kind = module_kind(mlp_output_module(adapter, adapter.blocks[blk]))
            for name in ("weight", "bias"):
                folds[(blk, f"{path}.{name}")] = (kind, T)
    kept = adapter.remove_blocks(plan.removed)  # fixes the skeleton's config
    new_index = {old: new for new, old in enumerate(kept)}
    tmp = temporary_sibling(out)
    try:
        keys_by_shard = {}
        for shard in shards:
            with safe_open(shard, framework="pt") as f:
                keys_by_shard[shard] = list(f.keys())
        pattern = _block_key_regex(blocks_path, [k for ks in keys_by_shard.values() for k in ks])
        weight_map: dict[str, str] = {}
        part, part_bytes, n_written = {}, 0, 0
        read = written = 0
        files: list[str] = []

        def flush():
            nonlocal part, part_bytes, n_written
            if part:
                name = f"model-part-{n_written:05d}.safetensors"
                save_file(part, tmp / name, metadata={"format": "pt"})
                files.append(name)
                for k in part:
                    weight_map[k] = name
                n_written += 1
                part, part_bytes = {}, 0

        for shard, keys in keys_by_shard.items():
            with safe_open(shard, framework="pt") as f:
                for key in keys:
                    m = pattern.match(key)
                    if m:
                        old = int(m.group(1))
                        if old not in new_index:
                            continue
                        new_key = key[:m.start(1)] + str(new_index[old]) + key[m.end(1):]
                    else:
                        new_key = key
                    tensor = f.get_tensor(key)
                    read += tensor.numel() * tensor.element_size()
                    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                        tensor = tensor.to(dtype)
                    if m and (old, m.group(2)) in folds:
                        kind, T = folds[(old, m.group(2))]
                        tensor = fold_state_tensor(kind, m.group(2).rsplit(".", 1)[1], tensor, T)
                    size = tensor.numel() * tensor.element_size()
                    if part and part_bytes + size > max_shard_bytes:
                        flush()
                    part[new_key] = tensor.contiguous()
                    part_bytes += size
                    written += size
        flush()
        if stats is not None:
            stats.update(bytes_read=read, bytes_written=written)
        if len(files) == 1:
            os.rename(tmp / files[0], tmp / "model.safetensors")
        else:
            total = 0
            for i, name in enumerate(files):
                final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
                os.rename(tmp / name, tmp / final)
                for k, v in list(weight_map.items()):
                    if v == name:
                        weight_map[k] = final
                total += (tmp / final).stat().st_size
            with open(tmp / "model.safetensors.index.json", "w") as fh:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=1)
        if dtype is not None:
            skeleton.config.dtype = dtype
        skeleton.config.save_pretrained(tmp)
        _write_generation_config(src, skeleton, tmp)
        try:
            AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
        except (OSError, ValueError, TypeError):
            pass  # a checkpoint without a tokenizer stays without one
        plan.save(tmp / "plan.json")
        save_cka_heatmap(tmp / "cka.png", plan.cka, plan.segments, plan.removed, title=heatmap_title(plan))
        commit_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
