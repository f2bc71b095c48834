"""`sglp prune --lazy` == `sglp prune` (in memory): the same plan and the same saved weights.

On a small checkpoint of benchmarks/make_synthetic.py (the 70B layout at tiny size, bf16 on disk, 6 blocks),
with the same settings, the default scorer (verified, compensated) and the paper's GradNorm. What "the same"
means, measured and asserted exactly (tolerance 0):
  - plan.json: the same document (removed blocks, segments, scores, CKA, the search's record), and the same
    compensation maps (compensation.safetensors, tensor for tensor);
  - weights: the same tensor names, dtypes and bits, in a bfloat16 and in a float32 run (both paths save in
    the compute dtype --dtype: --lazy casts each streamed tensor to it and folds the maps in float64 then rounds
    once, as the in-memory model does);
  - the same files in the output folder, and the same config.json and generation_config.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sglp_fast.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from make_synthetic import write_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lazy-eq") / "m"
    # seed 1: the verified search keeps a compensated plan, so the fold-on-read path is the one compared
    write_checkpoint(path, blocks=6, shape="tiny", seed=1, shard_bytes=100_000, log=lambda *_: None)
    return path


def _prune(model: Path, out: Path, *extra) -> dict:
    # a lazy model samples no fit windows of its own (each token would read every block): the in-memory run
    # is told the same, so that both fit their maps on the same windows
    argv = ["prune", str(model), "--remove", "2", "--calib-seqs", "6", "--seq-len", "32", "--verify-windows", "2",
            "--self-fit-windows", "0", "--no-eval", "-q", "-o", str(out), "--json", str(out.parent / (out.name + ".json")), *map(str, extra)]
    assert main(argv) == 0
    return json.loads((out.parent / (out.name + ".json")).read_text())


def _tensors(folder: Path, pattern: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob(pattern)):
        out.update(load_file(f))
    return out


def _both(checkpoint: Path, tmp_path: Path, *extra) -> tuple[Path, Path]:
    _prune(checkpoint, tmp_path / "mem", *extra)
    _prune(checkpoint, tmp_path / "lazy", "--lazy", *extra)
    return tmp_path / "mem", tmp_path / "lazy"


def _assert_same_plan(mem: Path, lazy: Path) -> dict:
    plan_mem = json.loads((mem / "plan.json").read_text())
    assert plan_mem == json.loads((lazy / "plan.json").read_text())
    maps_mem, maps_lazy = _tensors(mem, "compensation.safetensors"), _tensors(lazy, "compensation.safetensors")
    assert maps_mem.keys() == maps_lazy.keys()
    assert all(torch.equal(maps_mem[k], maps_lazy[k]) for k in maps_mem)
    return plan_mem


def test_default_scorer_float32_same_plan_and_weights(checkpoint, tmp_path):
    mem, lazy = _both(checkpoint, tmp_path, "--dtype", "float32")
    plan = _assert_same_plan(mem, lazy)
    assert len(plan["removed"]) == 2 and plan.get("compensation")
    w_mem, w_lazy = _tensors(mem, "model*.safetensors"), _tensors(lazy, "model*.safetensors")
    assert w_mem.keys() == w_lazy.keys()
    source = _tensors(checkpoint, "*.safetensors")
    folded = []
    for name, t in w_lazy.items():
        assert t.dtype == torch.float32 and w_mem[name].dtype == torch.float32, name
        assert torch.equal(w_mem[name], t), name
        if not torch.equal(t.to(torch.bfloat16).float(), t):  # the bf16 source, unless a map was folded into it
            folded.append(name)
    assert folded and all(name.endswith("mlp.down_proj.weight") for name in folded), folded
    assert all(v.dtype == torch.bfloat16 for v in source.values())
    _assert_same_files(mem, lazy)


def _assert_same_files(mem: Path, lazy: Path) -> None:
    """The same files (shards may be cut differently), config.json and generation_config.json alike."""
    def names(folder: Path) -> set[str]:
        return {p.name for p in folder.iterdir() if not p.name.startswith("model")}

    assert names(mem) == names(lazy)
    assert (mem / "generation_config.json").is_file()
    for name in ("config.json", "generation_config.json"):
        assert json.loads((mem / name).read_text()) == json.loads((lazy / name).read_text()), name


def test_default_scorer_bfloat16_bit_identical(checkpoint, tmp_path):
    # with run candidates: their all-token distances come from the kept inputs too
    mem, lazy = _both(checkpoint, tmp_path, "--dtype", "bfloat16", "--run-candidates", "3")
    _assert_same_plan(mem, lazy)
    w_mem, w_lazy = _tensors(mem, "model*.safetensors"), _tensors(lazy, "model*.safetensors")
    assert w_mem.keys() == w_lazy.keys()
    assert all(w_mem[k].dtype == w_lazy[k].dtype == torch.bfloat16 and torch.equal(w_mem[k], w_lazy[k])
               for k in w_mem)
    _assert_same_files(mem, lazy)


def test_gradnorm_same_plan_and_weights(checkpoint, tmp_path):
    mem, lazy = _both(checkpoint, tmp_path, "--scorer", "gradnorm", "--dtype", "float32")
    plan = _assert_same_plan(mem, lazy)
    assert plan["scorer"] == "gradnorm" and len(plan["removed"]) == 2
    w_mem, w_lazy = _tensors(mem, "model*.safetensors"), _tensors(lazy, "model*.safetensors")
    assert w_mem.keys() == w_lazy.keys()
    assert all(w_lazy[k].dtype == torch.float32 and torch.equal(w_mem[k], w_lazy[k]) for k in w_mem)
