"""Exports of a plan to mergekit (passthrough YAML) and llama.cpp (llama-quantize --prune-layers)."""
from __future__ import annotations

import shlex

import numpy as np
import pytest
import torch

from sglp_fast.plan import Plan
from sglp_fast.pruning.exports import export_mergekit, kept_ranges, llama_cpp_command


def _plan(removed, L=12, transforms=None) -> Plan:
    extra = {"compensation": {"blocks": sorted(transforms), "alpha": 1.0}} if transforms else {}
    return Plan(model={"id": "tiny-llama", "num_blocks": L, "config_hash": "sha256:" + "0" * 64}, calibration={},
                cka=np.eye(L), segments=[(0, L - 1)], k=1, k_rule="given", scorer="random",
                scores={"random": [0.0] * L}, removed=removed,
                budget=None if removed is None else {"remove": len(removed)},
                extra=extra, transforms=transforms)


@pytest.mark.parametrize("removed", [[3, 4, 9], [0, 1, 11], [5], [], [0, 2, 4, 6, 8, 10]])
def test_mergekit_slices_cover_exactly_the_kept_blocks(removed):
    yaml = pytest.importorskip("yaml")
    text = export_mergekit(_plan(removed), "org/My Model: v2 #1", dtype="float16")
    doc = yaml.safe_load(text)
    assert doc["merge_method"] == "passthrough" and doc["dtype"] == "float16"
    layers = []
    for s in doc["slices"]:
        (src,) = s["sources"]
        assert src["model"] == "org/My Model: v2 #1"  # quoting survives ':' and '#'
        a, b = src["layer_range"]
        assert a < b
        layers += range(a, b)  # half-open
    assert layers == [i for i in range(12) if i not in removed]
    assert len(doc["slices"]) == len(kept_ranges(12, removed))  # maximal runs: no two slices touch
    ends = [s["sources"][0]["layer_range"] for s in doc["slices"]]
    assert all(prev[1] < nxt[0] for prev, nxt in zip(ends, ends[1:]))


def test_kept_ranges_by_hand():
    assert kept_ranges(8, [2, 3, 6]) == [(0, 2), (4, 6), (7, 8)]
    assert kept_ranges(4, [0, 3]) == [(1, 3)]


def test_llama_cpp_command():
    cmd = llama_cpp_command(_plan([3, 4, 9]), "models/in file.gguf", "out.gguf")
    assert cmd == "llama-quantize --prune-layers 3,4,9 'models/in file.gguf' out.gguf COPY"
    argv = shlex.split(cmd)
    assert argv[1:3] == ["--prune-layers", "3,4,9"] and argv[3:] == ["models/in file.gguf", "out.gguf", "COPY"]
    assert shlex.split(llama_cpp_command(_plan([1]), "a.gguf", "b.gguf", "Q4_K_M", allow_requantize=True)) == [
        "llama-quantize", "--allow-requantize", "--prune-layers", "1", "a.gguf", "b.gguf", "Q4_K_M"]
    with pytest.raises(ValueError, match="removes no blocks"):
        llama_cpp_command(_plan([]), "a.gguf", "b.gguf")
    with pytest.raises(ValueError, match="gguf_out: must differ"):
        llama_cpp_command(_plan([1]), "a.gguf", "a.gguf")
    with pytest.raises(ValueError, match="qtype"):
        llama_cpp_command(_plan([1]), "a.gguf", "b.gguf", "Q4; rm -rf /")


def test_compensated_plans_are_refused_with_what_to_use_instead():
    T = {2: torch.eye(4, dtype=torch.float64)}
    plan = _plan([3, 4], transforms=T)
    with pytest.raises(ValueError, match=r"compensates removed blocks.*\[2\].*sglp apply PLAN --output DIR"):
        export_mergekit(plan, "org/model")
    with pytest.raises(ValueError, match=r"compensates removed blocks.*sglp apply PLAN --format gguf"):
        llama_cpp_command(plan, "a.gguf", "b.gguf")


def test_other_refusals():
    with pytest.raises(ValueError, match="no 'removed' blocks"):
        export_mergekit(_plan(None), "org/model")
    with pytest.raises(ValueError, match="model_ref"):
        export_mergekit(_plan([1]), "")
    with pytest.raises(ValueError, match="dtype: expected one of"):
        export_mergekit(_plan([1]), "org/model", dtype="fp8")
    with pytest.raises(TypeError, match="plan: expected"):
        export_mergekit({"removed": [1]}, "org/model")
