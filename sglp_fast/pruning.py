"""Apply a plan to a model and write the pruned model so that plain ``from_pretrained`` loads it.

(Named pruning.py, not prune.py: a submodule `prune` would shadow the API function ``sglp_fast.prune``.)

The output directory is assembled in a temporary sibling directory and renamed into place at the end, so
an interrupted run never leaves a half-written model behind; an existing non-empty directory is refused
unless ``overwrite=True``. Contents: ``save_pretrained`` weights (safetensors) and config, the tokenizer,
``plan.json`` and ``cka.png`` (the CKA heatmap with segments and removed blocks marked).

For checkpoints too big to load, ``prune_checkpoint`` streams the safetensors shards: it copies only the
kept blocks' tensors, renamed to their new indices, one tensor at a time, and fixes the config through the
model adapter applied to a weightless (meta-device) skeleton.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .plan import Plan


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse (before any expensive work) an output directory that would be clobbered without consent."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output: {str(out)!r} exists and is not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"output: directory {str(out)!r} exists and is not empty; pass --overwrite "
                         "(overwrite=True) to replace it, or choose another path")
    return out


def apply_plan(model: Any, plan: Plan, check: bool = True) -> Any:
    """Remove ``plan.removed`` from ``model`` in place (after checking the plan was made for it)."""
    if plan.removed is None:
        raise ValueError("plan: has no 'removed' blocks (an analysis without a budget); re-run `sglp analyze` "
                         "or `sglp prune` with --remove/--ratio")
    if check:
        plan.check_model(model)
    if plan.extra.get("compensation") is not None and plan.transforms is None:
        raise ValueError("plan: compensates removed blocks but carries no maps; load it with Plan.load from "
                         "the folder holding compensation.safetensors")
    return remove_blocks(model, plan.removed, plan.transforms)


def remove_blocks(model: Any, removed: Any, transforms: Any = None) -> Any:
    """Fold compensation maps (if any) into the kept blocks, then drop ``removed``, in place; no plan checks."""
    from .models import get_adapter  # noqa: PLC0415

    adapter = get_adapter(model)
    if transforms:
        from .compensate import apply_transforms  # noqa: PLC0415

        apply_transforms(adapter, transforms)  # indices are the original ones: fold before the removal
    adapter.remove_blocks(list(removed))
    return model


def _strip_load_time_quantization(model: Any) -> None:
    """A GGUF checkpoint is dequantized at load; the saved weights are plain, so drop the GGUF marker."""
    qc = getattr(model.config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if str(method).lower().endswith("gguf"):
        del model.config.quantization_config
        for attr in ("hf_quantizer", "quantization_method"):
            if getattr(model, attr, None) is not None:
                setattr(model, attr, None)
        if hasattr(model, "is_quantized"):
            try:
                model.is_quantized = False
            except AttributeError:
                pass


def _commit(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished temporary directory to ``out`` (replacing an old one only when allowed)."""
    if out.exists():
        if any(out.iterdir()) and not overwrite:
            raise ValueError(f"output: {str(out)!r} appeared while pruning and is not empty; pass --overwrite")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def _temp_sibling(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the final directory gets the usual permissions
    return tmp


def _title(plan: Plan) -> str:
    name = os.path.basename(str(plan.model.get("id", "")).rstrip("/")) or "model"
    return f"{name}: CKA, {plan.k} segments, {len(plan.removed or ())} of {plan.num_blocks} blocks removed"


def save_pruned(model: Any, tokenizer: Any, plan: Plan, output_dir: str | os.PathLike,
                overwrite: bool = False) -> Path:
    """Write the (already pruned) model, tokenizer, plan.json and cka.png to ``output_dir`` atomically."""
    from .heatmap import save_cka_heatmap  # noqa: PLC0415

    out = check_output_dir(output_dir, overwrite)
    tmp = _temp_sibling(out)
    try:
        _strip_load_time_quantization(model)
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        plan.save(tmp / "plan.json")
        save_cka_heatmap(tmp / "cka.png", plan.cka, plan.segments, plan.removed or (),
                         title=_title(plan))
        _commit(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ------------------------------------------------------------------------------- streamed (big models)
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


def prune_checkpoint(src_dir: str | os.PathLike, plan: Plan, output_dir: str | os.PathLike,
                     overwrite: bool = False, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Prune a safetensors checkpoint on disk without loading the model: kept tensors only, renamed."""
    import torch  # noqa: PLC0415
    from safetensors import safe_open  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    from .heatmap import save_cka_heatmap  # noqa: PLC0415
    from .models import get_adapter  # noqa: PLC0415

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
        from .compensate import mlp_output_module, module_kind  # noqa: PLC0415

        if plan.transforms is None:
            raise ValueError("plan: compensates removed blocks but carries no maps; load it with Plan.load")
        path = adapter.mlp_output_path()
        for blk, T in plan.transforms.items():
            kind = module_kind(mlp_output_module(adapter, adapter.blocks[blk]))
            for name in ("weight", "bias"):
                folds[(blk, f"{path}.{name}")] = (kind, T)
    kept = adapter.remove_blocks(plan.removed)  # fixes the skeleton's config
    new_index = {old: new for new, old in enumerate(kept)}
    tmp = _temp_sibling(out)
    try:
        keys_by_shard = {}
        for shard in shards:
            with safe_open(shard, framework="pt") as f:
                keys_by_shard[shard] = list(f.keys())
        pattern = _block_key_regex(blocks_path, [k for ks in keys_by_shard.values() for k in ks])
        weight_map: dict[str, str] = {}
        part, part_bytes, n_written = {}, 0, 0
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
                    if m and (old, m.group(2)) in folds:
                        from .compensate import fold_state_tensor  # noqa: PLC0415

                        kind, T = folds[(old, m.group(2))]
                        tensor = fold_state_tensor(kind, m.group(2).rsplit(".", 1)[1], tensor, T)
                    size = tensor.numel() * tensor.element_size()
                    if part and part_bytes + size > max_shard_bytes:
                        flush()
                    part[new_key] = tensor.contiguous()
                    part_bytes += size
        flush()
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
        skeleton.config.save_pretrained(tmp)
        for extra in ("generation_config.json",):
            if (src / extra).is_file():
                shutil.copy2(src / extra, tmp / extra)
        try:
            AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
        except (OSError, ValueError, TypeError):
            pass  # a checkpoint without a tokenizer stays without one
        plan.save(tmp / "plan.json")
        save_cka_heatmap(tmp / "cka.png", plan.cka, plan.segments, plan.removed, title=_title(plan))
        _commit(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
