"""Hand a plan to other tools: a mergekit passthrough config, a llama.cpp ``llama-quantize`` command.

Why: users who already run mergekit or llama.cpp can apply the plan with the tool they trust. Both tools only
drop or copy layers, so neither can carry compensation (maps folded into kept weights): a compensated plan
is refused with the sglp command that does carry it, never exported as if it were plain.
"""
from __future__ import annotations

import json
import shlex

from ..plan import Plan

MERGEKIT_DTYPES = ("bfloat16", "float16", "float32")


def _removed(plan: Plan, target: str, instead: str) -> list[int]:
    """The plan's removed blocks, after refusing plans the target tool cannot reproduce."""
    if not isinstance(plan, Plan):
        raise TypeError(f"plan: expected a sglp_fast.plan.Plan (Plan.load('plan.json')), got {type(plan).__name__}")
    if plan.removed is None:
        raise ValueError("plan: has no 'removed' blocks (an analysis without a budget); re-run `sglp analyze` or "
                         "`sglp prune` with --remove/--ratio")
    comp = plan.extra.get("compensation")
    if comp is not None:
        raise ValueError(f"plan: compensates removed blocks (maps folded into blocks {comp.get('blocks')}), which "
                         f"{target} cannot carry: it would only drop layers and lose the maps. Use {instead}, or "
                         "re-plan with --no-compensate")
    return list(plan.removed)


def kept_ranges(num_blocks: int, removed: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of kept blocks as half-open [a, b) ranges, in order."""
    gone = set(removed)
    ranges: list[tuple[int, int]] = []
    for i in range(num_blocks):
        if i in gone:
            continue
        if ranges and ranges[-1][1] == i:
            ranges[-1] = (ranges[-1][0], i + 1)
        else:
            ranges.append((i, i + 1))
    return ranges


def export_mergekit(plan: Plan, model_ref: str, dtype: str = "bfloat16") -> str:
    """A mergekit ``passthrough`` YAML that rebuilds the pruned model from ``model_ref`` (hub name or path).

    Each slice copies one run of kept blocks (``layer_range`` is half-open, as mergekit reads it); run it
    with ``mergekit-yaml config.yml OUT_DIR``."""
    removed = _removed(plan, "a mergekit passthrough merge",
                       "`sglp apply PLAN --output DIR` (safetensors with the maps folded in)")
    if not isinstance(model_ref, str) or not model_ref.strip():
        raise ValueError(f"model_ref: expected the hub name or local path of the model the plan was made for, got "
                         f"{model_ref!r}")
    if dtype not in MERGEKIT_DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(MERGEKIT_DTYPES)}, got {dtype!r}")
    ref = json.dumps(model_ref)  # a JSON string is a valid YAML double-quoted scalar (paths with ':' or '#')
    lines = [f"# sglp-fast plan for {plan.model['id']}: removes blocks {removed} of {plan.num_blocks}",
             "slices:"]
    for a, b in kept_ranges(plan.num_blocks, removed):
        lines += ["  - sources:", f"      - model: {ref}", f"        layer_range: [{a}, {b}]"]
    lines += ["merge_method: passthrough", f"dtype: {dtype}"]
    return "\n".join(lines) + "\n"


def llama_cpp_command(plan: Plan, gguf_in: str, gguf_out: str, qtype: str = "COPY", *,
                      allow_requantize: bool = False) -> str:
    """The ``llama-quantize --prune-layers L0,L1,... IN OUT TYPE`` command line that drops the plan's blocks.

    Spelling from llama.cpp's tools/quantize/quantize.cpp (ggml-org/llama.cpp): options come before the
    positional ``input output type``, ``--prune-layers`` takes one comma-separated list of layer numbers, and
    type ``COPY`` copies every kept tensor without requantizing (keeps the source quantization); llama.cpp
    renumbers ``blk.N`` and sets ``<arch>.block_count``. It does not shorten per-layer metadata arrays: for
    architectures with such arrays use ``sglp prune --format gguf``/``sglp apply PLAN --format gguf``.
    Another type on an already quantized input needs ``allow_requantize=True`` (``--allow-requantize``)."""
    removed = _removed(plan, "llama-quantize --prune-layers",
                       "`sglp apply PLAN --format gguf` (writes the pruned GGUF with the maps folded in)")
    if not removed:
        raise ValueError("plan: removes no blocks; there is nothing for llama-quantize to prune")
    for name, value in (("gguf_in", gguf_in), ("gguf_out", gguf_out)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name}: expected a .gguf file path, got {value!r}")
    if gguf_in == gguf_out:
        raise ValueError(f"gguf_out: must differ from gguf_in ({gguf_in!r}); llama-quantize writes a new file")
    if not isinstance(qtype, str) or not qtype.replace("_", "").isalnum():
        raise ValueError(f"qtype: expected a llama-quantize type such as COPY, Q4_K_M or Q8_0, got {qtype!r}")
    layers = ",".join(str(i) for i in removed)
    flags = ["--allow-requantize"] if allow_requantize else []
    return " ".join(["llama-quantize", *flags, "--prune-layers", layers, shlex.quote(gguf_in), shlex.quote(gguf_out),
                     qtype])
