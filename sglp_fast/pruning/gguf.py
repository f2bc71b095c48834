"""GGUF in, GGUF out: prune a GGUF file without dequantizing what the plan does not change.

Why: a quantized GGUF (llama.cpp, Ollama, LM Studio) is often all a user has or wants to ship. Going through
transformers dequantizes every tensor; writing the pruned model back as GGUF would then need a fresh
quantization (and llama.cpp tools). Here the kept blocks' tensors are copied byte for byte (their quantized
blocks are independent of the block's position), renamed ``blk.<old>`` -> ``blk.<new>``; the metadata gets
the new ``<arch>.block_count`` and every per-layer array (an ``<arch>.*`` array as long as the old block
count, e.g. per-layer head counts) loses the removed entries.

Compensation changes one tensor per compensated block: the MLP output projection ``blk.<i>.ffn_down``. ggml
stores a matrix with ``ne = [in, out]``, i.e. as numpy rows = output features: the torch ``nn.Linear`` layout
[out, in] whatever the architecture (GPT-2's Conv1D is transposed at conversion). So the fold is the linear
one, ``W <- T^T W`` and ``b <- b T`` (``selection.compensation.fold_state_tensor``), done in float64 on the
dequantized tensor, in column chunks (whole quantization blocks) so memory stays bounded on big models.
The folded tensor is requantized to its source type when ``gguf.quants`` can quantize that type, else
written as F16 (``requantize=False``: always F16); metadata ``sglp.compensation.tensor_type`` says which.

The file is written to a temporary sibling and renamed into place: never a partial output file.
"""
from __future__ import annotations

import os
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..plan import Plan
from ..selection.compensation import fold_state_tensor

GGUF_MAGIC = b"GGUF"
FOLD_TENSOR = "ffn_down"  # llama.cpp's name for the MLP output projection in every dense architecture
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
_CHUNK_BYTES = 256 * 1024**2  # float64 working set of one fold chunk
# Scalar metadata that gives layers roles by their position (every n-th layer is MoE, the first k are dense, the
# last n are MTP heads...): dropping blocks would shift those roles, and no renumbering can express that.
_POSITIONAL_KEYS = ("leading_dense_block_count", "moe_every_n_layers", "nextn_predict_layers",
                    "rescale_every_n_layers", "interleave_moe_layer_step", "full_attention_interval",
                    "attention.shared_kv_layers", "attention.sliding_window_pattern")
# Architectures whose loaders (llama.cpp, transformers) derive sliding-window layers from the layer index alone.
_POSITIONAL_ARCHS = ("gemma2", "gemma3", "gemma3n", "cohere2", "llama4")


def _open_gguf(src: Path):
    """The reader of a single-file GGUF, or a ValueError that says what to pass instead."""
    import gguf  # noqa: PLC0415  (gguf-py: needed only here)

    if not src.is_file():
        raise ValueError(f"src_gguf: {str(src)!r} is not a file; pass the path of a .gguf model file")
    with open(src, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"src_gguf: {str(src)!r} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r}); "
                         "for a safetensors checkpoint use `sglp apply PLAN --output DIR` (pruning.prune_checkpoint)")
    try:
        reader = gguf.GGUFReader(src, "r")
    except Exception as e:  # gguf-py raises ValueError/struct.error/... on a truncated file
        raise ValueError(f"src_gguf: {str(src)!r} is not a readable GGUF file ({type(e).__name__}: {e}); it is "
                         "truncated or corrupted") from None
    split = reader.get_field("split.count")
    if split is not None and int(split.contents()) > 1:
        raise ValueError(f"src_gguf: {str(src)!r} is one shard of a {int(split.contents())}-file split GGUF; merge it "
                         "first (`llama-gguf-split --merge FIRST-SHARD OUT.gguf`) and pass the merged file")
    return reader


def _field(reader, key: str) -> Any:
    f = reader.get_field(key)
    return None if f is None else f.contents()


def _check_plan_alone(plan: Plan) -> None:
    """Refuse, before reading the model, a plan that cannot be applied at all."""
    if not isinstance(plan, Plan):
        raise TypeError(f"plan: expected a sglp_fast.plan.Plan (Plan.load('plan.json')), got {type(plan).__name__}")
    if plan.removed is None:
        raise ValueError("plan: has no 'removed' blocks (an analysis without a budget); re-run `sglp analyze` or "
                         "`sglp prune` with --remove/--ratio")
    if plan.extra.get("compensation") is not None and plan.transforms is None:
        raise ValueError("plan: compensates removed blocks but carries no maps; load it with Plan.load from the "
                         "folder holding compensation.safetensors")


def _check_out(out: Path, src: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output path that is a folder, the source, or an existing file."""
    if out.is_dir():
        raise ValueError(f"out_path: {str(out)!r} is a directory; pass a file path such as {str(out / 'model.gguf')!r}")
    if out.exists():
        if src.exists() and out.samefile(src):
            raise ValueError(f"out_path: {str(out)!r} is the source file; write the pruned model to another path")
        if not overwrite:
            raise ValueError(f"out_path: {str(out)!r} exists; pass overwrite=True (--overwrite) to replace it, or "
                             "choose another path")


def _check_plan(reader, src: Path, plan: Plan, arch: str, check_config: bool) -> int:
    """The source's block count, after refusing a plan made for another model or a file it cannot prune."""
    import gguf  # noqa: PLC0415

    L = _field(reader, f"{arch}.block_count")
    if L is None:
        raise ValueError(f"src_gguf: {str(src)!r} has no '{arch}.block_count' metadata; not a model GGUF sglp can "
                         "prune")
    L = int(L)
    positional = [f"{arch}.{k}" for k in _POSITIONAL_KEYS
                  if (f := reader.get_field(f"{arch}.{k}")) is not None and f.types[0] != gguf.GGUFValueType.ARRAY]
    if positional or arch in _POSITIONAL_ARCHS:
        why = f"its metadata {positional}" if positional else f"llama.cpp and transformers for {arch!r}"
        raise ValueError(f"src_gguf: {src.name} gives layers roles by their index ({why}), so renumbering the kept "
                         "blocks would change what they do; prune the safetensors checkpoint instead (`sglp apply "
                         "PLAN --output DIR`) and convert that to GGUF")
    if L != plan.num_blocks:
        raise ValueError(f"plan: made for a model with {plan.num_blocks} blocks ({plan.model['id']}), but "
                         f"{src.name} has {L} ({arch}.block_count); pass the GGUF of the model the plan was made for")
    if check_config:
        from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415  (heavy)

        try:
            config = AutoConfig.from_pretrained(str(src.parent), gguf_file=src.name)
        except Exception as e:  # transformers raises ValueError/KeyError/... for architectures it cannot read
            raise ValueError(f"src_gguf: transformers cannot build a config from {src.name} ({type(e).__name__}: "
                             f"{e}), so the plan's config hash cannot be checked; pass check_config=False to check "
                             "only the block count") from None
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        try:
            plan.check_model(skeleton)
        except ValueError as e:
            raise ValueError(f"{e} (if the plan was made on this model's original checkpoint and the GGUF is its "
                             "conversion, configs may differ in keys: pass check_config=False)") from None
    return L


def _quantizable(qtype) -> bool:
    """Whether gguf-py has a numpy quantizer for ``qtype`` (it has dequantizers for more types than that)."""
    from gguf import quants  # noqa: PLC0415
    from gguf.constants import GGML_QUANT_SIZES  # noqa: PLC0415

    block = GGML_QUANT_SIZES[qtype][0]
    try:
        quants.quantize(np.zeros((1, block), dtype=np.float32), qtype)
    except NotImplementedError:
        return False
    return True


def _dequantizable(qtype) -> bool:
    """Whether gguf-py can turn ``qtype`` back into floats (needed to fold a map into the tensor)."""
    from gguf import quants  # noqa: PLC0415
    from gguf.constants import GGML_QUANT_SIZES  # noqa: PLC0415

    try:
        quants.dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _folded_bytes(tensor, T: torch.Tensor, kind: str, target) -> np.ndarray:
    """The source tensor (numpy rows = output features) with T folded in, encoded as ``target``.

    Column chunks of whole quantization blocks: the fold mixes rows only (W <- T^T W), so each column chunk
    is independent, and the quantizers work on row blocks that never straddle a chunk."""
    from gguf import quants  # noqa: PLC0415
    from gguf.constants import GGML_QUANT_SIZES  # noqa: PLC0415

    src_type = tensor.tensor_type
    raw = np.asarray(tensor.data)
    raw = raw.view(np.uint8).reshape(raw.shape[0], -1) if raw.ndim == 2 else raw.view(np.uint8).reshape(1, -1)
    in_block, in_bytes = GGML_QUANT_SIZES[src_type]
    out_block, out_bytes = GGML_QUANT_SIZES[target]
    rows = raw.shape[0]
    n_blocks = raw.shape[1] // in_bytes
    cols = n_blocks * in_block
    if kind == "bias":
        dense = quants.dequantize(np.ascontiguousarray(raw), src_type).reshape(-1)
        t = fold_state_tensor("linear", "bias", torch.from_numpy(dense.astype(np.float64)), T).numpy()
        return np.ascontiguousarray(quants.quantize(t.astype(np.float32), target)).view(np.uint8).reshape(-1)
    if cols % out_block:
        raise ValueError(f"gguf: {tensor.name} has rows of {cols} values, not a multiple of {target.name}'s block "
                         f"of {out_block}; pass requantize=False (F16)")
    step = max(1, _CHUNK_BYTES // (8 * rows * in_block)) * in_block  # columns per chunk, whole source blocks
    step = step * out_block // np.gcd(step, out_block)  # ... and whole target blocks
    out = np.empty((rows, cols // out_block * out_bytes), dtype=np.uint8)
    for c0 in range(0, cols, step):
        c1 = min(cols, c0 + step)
        part = np.ascontiguousarray(raw[:, c0 // in_block * in_bytes: c1 // in_block * in_bytes])
        dense = quants.dequantize(part, src_type).reshape(rows, c1 - c0).astype(np.float64)
        folded = fold_state_tensor("linear", "weight", torch.from_numpy(dense), T).numpy()
        q = np.ascontiguousarray(quants.quantize(folded.astype(np.float32), target))
        out[:, c0 // out_block * out_bytes: c1 // out_block * out_bytes] = q.view(np.uint8).reshape(rows, -1)
    return out


def write_pruned_gguf(src_gguf: str | os.PathLike, plan: Plan, out_path: str | os.PathLike, requantize: bool = True,
                      *, overwrite: bool = False, check_config: bool = True) -> dict[str, Any]:
    """Write ``out_path``: the GGUF ``src_gguf`` without the plan's removed blocks, kept tensors byte for byte.

    ``requantize``: tensors that compensation changed go back to their source type when gguf-py can quantize
    it (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/F16/BF16/F32...), else F16; False: always F16. ``check_config`` builds the
    transformers config of the GGUF (a few seconds) and refuses a plan whose config hash differs; False
    checks only the block count. Returns sizes and counts: ``path``, ``source_bytes``, ``output_bytes``,
    ``block_count`` (new), ``kept`` and ``removed`` (original indices), ``tensor_types`` (output type name ->
    tensor count), ``compensated`` (tensor name in the output -> type written), ``per_layer_keys`` (metadata
    arrays that lost entries).
    """
    import gguf  # noqa: PLC0415

    if not isinstance(requantize, bool):
        raise TypeError(f"requantize: expected True or False, got {requantize!r}")
    src = Path(os.path.abspath(os.fspath(src_gguf)))
    out = Path(os.path.abspath(os.fspath(out_path)))
    _check_plan_alone(plan)
    _check_out(out, src, overwrite)
    reader = _open_gguf(src)
    arch = _field(reader, "general.architecture")
    if not isinstance(arch, str):
        raise ValueError(f"src_gguf: {str(src)!r} has no general.architecture; not a model GGUF")
    L = _check_plan(reader, src, plan, arch, check_config)

    removed = set(plan.removed)
    kept = [i for i in range(L) if i not in removed]
    new_index = {old: new for new, old in enumerate(kept)}
    names = {t.name for t in reader.tensors}
    folds: dict[str, tuple[str, torch.Tensor]] = {}  # source tensor name -> (weight|bias, T)
    for blk, T in (plan.transforms or {}).items():
        name = f"blk.{blk}.{FOLD_TENSOR}.weight"
        if name not in names:
            raise ValueError(f"plan: compensates block {blk}, but {src.name} has no tensor {name!r} (the MLP output "
                             f"projection of a dense {arch} block); re-plan with --no-compensate")
        folds[name] = ("weight", torch.as_tensor(T, dtype=torch.float64))
        if f"blk.{blk}.{FOLD_TENSOR}.bias" in names:
            folds[f"blk.{blk}.{FOLD_TENSOR}.bias"] = ("bias", torch.as_tensor(T, dtype=torch.float64))

    if folds and reader.endianess != gguf.GGUFEndian.LITTLE:
        raise ValueError(f"src_gguf: {src.name} is a big-endian GGUF; folding compensation into it is not supported "
                         "(convert it to little-endian with gguf_convert_endian.py, or re-plan with --no-compensate)")

    # tensors: (output name, reader tensor, output type, fold or None)
    plan_rows: list[tuple[str, Any, Any, tuple[str, torch.Tensor] | None]] = []
    compensated: dict[str, str] = {}
    weight_types: set[str] = set()
    for t in reader.tensors:
        m = _BLOCK.match(t.name)
        name = t.name
        if m:
            old = int(m.group(1))
            if old >= L:
                raise ValueError(f"src_gguf: tensor {t.name!r} belongs to block {old}, beyond {arch}.block_count={L} "
                                 "(extra layers such as MTP heads are not supported); cannot prune this file")
            if old in removed:
                continue
            name = f"blk.{new_index[old]}.{m.group(2)}"
        fold = folds.get(t.name)
        qtype = t.tensor_type
        if fold is not None:
            if not _dequantizable(qtype):
                raise ValueError(f"src_gguf: {t.name} is {qtype.name}, which gguf-py cannot dequantize, so the "
                                 "compensation map cannot be folded into it; re-plan with --no-compensate, or prune "
                                 "the safetensors checkpoint (`sglp apply PLAN --output DIR`)")
            if fold[0] == "bias":  # a vector: kept in its (float) source type, F32 when gguf-py cannot write it
                qtype = qtype if _quantizable(qtype) else gguf.GGMLQuantizationType.F32
            else:
                qtype = qtype if requantize and _quantizable(qtype) else gguf.GGMLQuantizationType.F16
                weight_types.add(qtype.name)
            compensated[name] = qtype.name
        plan_rows.append((name, t, qtype, fold))

    writer = None
    tmp = None
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(tmp_name)
        writer = gguf.GGUFWriter(tmp, arch, endianess=reader.endianess)
        writer.data_alignment = reader.alignment
        per_layer = []
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name == "general.architecture":
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            value = field.contents()
            if field.name == f"{arch}.block_count":
                value = len(kept)
            elif (sub is not None and len(field.types) == 2 and field.name.startswith(f"{arch}.")
                    and len(value) == L):
                value = [v for i, v in enumerate(value) if i not in removed]
                per_layer.append(field.name)
            writer.add_key_value(field.name, value, vtype, sub_type=sub)
        writer.add_key_value("sglp.version", __version__, gguf.GGUFValueType.STRING)
        writer.add_key_value("sglp.source_block_count", L, gguf.GGUFValueType.UINT32)
        if plan.removed:  # GGUF arrays cannot be empty: a plan that removes nothing writes no list
            writer.add_key_value("sglp.removed", list(plan.removed), gguf.GGUFValueType.ARRAY,
                                 sub_type=gguf.GGUFValueType.INT32)
        if compensated:
            writer.add_key_value("sglp.compensation.blocks", sorted(plan.transforms), gguf.GGUFValueType.ARRAY,
                                 sub_type=gguf.GGUFValueType.INT32)
            writer.add_key_value("sglp.compensation.tensor_type", ",".join(sorted(weight_types)),
                                 gguf.GGUFValueType.STRING)
        from gguf import quants  # noqa: PLC0415

        for name, t, qtype, fold in plan_rows:
            if fold is None:
                writer.add_tensor_info(name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
            else:
                shape = [int(x) for x in reversed(t.shape)]  # ne reversed: numpy order, rows last-but-one
                nbytes = int(np.prod(quants.quant_shape_to_byte_shape(shape, qtype)))
                writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, t, qtype, fold in plan_rows:
            if fold is None:
                writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
            else:
                writer.write_tensor_data(_folded_bytes(t, fold[1], fold[0], qtype), tensor_endianess=reader.endianess)
        writer.flush()
        os.fsync(writer.fout[0].fileno())
        writer.close()
        writer = None
        os.replace(tmp, out)
        tmp = None
    finally:
        if writer is not None:
            writer.close()
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return {"path": str(out), "source_bytes": src.stat().st_size, "output_bytes": out.stat().st_size,
            "block_count": len(kept), "kept": kept, "removed": list(plan.removed),
            "tensor_types": dict(Counter(q.name for _, _, q, _ in plan_rows)), "compensated": compensated,
            "per_layer_keys": per_layer}
