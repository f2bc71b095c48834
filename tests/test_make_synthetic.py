"""benchmarks/make_synthetic.py: a Llama-3-70B-shaped checkpoint layout (here at tiny size), deterministic,
sharded with an index, loadable by transformers and prunable by `sglp prune --lazy`."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from make_synthetic import SHAPES, config_for, tensor_specs, write_checkpoint  # noqa: E402


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_same_seed_same_bytes_and_it_loads(tmp_path):
    a = write_checkpoint(tmp_path / "a", blocks=3, shape="tiny", seed=7, shard_bytes=200_000, log=lambda *_: None)
    write_checkpoint(tmp_path / "b", blocks=3, shape="tiny", seed=7, shard_bytes=90_000, log=lambda *_: None)
    assert a["shards"] >= 2
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {name for name, _, _ in tensor_specs(config_for("tiny", 3))}
    from safetensors.torch import load_file  # the same tensors whatever the shard size

    def tensors(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(f))
        return out
    ta, tb = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    write_checkpoint(tmp_path / "c", blocks=3, shape="tiny", seed=7, shard_bytes=200_000, log=lambda *_: None)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "c")  # byte-identical files
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert model.config.num_hidden_layers == 3 and model.config.rope_parameters["rope_theta"] == 500000.0
    ids = torch.randint(0, 400, (2, 32), generator=torch.Generator().manual_seed(0))
    logits = model(ids).logits
    assert torch.isfinite(logits).all() and logits.std() > 0


def test_70b_shapes_are_llama3_70b():
    cfg = config_for("70b", 80)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.vocab_size) == (8192, 28672, 64, 8, 128, 128256)
    block = sum(torch.Size(s).numel() for n, s, _ in tensor_specs(config_for("70b", 1)) if ".layers.0." in n)
    assert abs(block * 80 + 2 * 128256 * 8192 - 70.55e9) < 0.05e9  # Llama-3-70B's 70.6B parameters
    assert SHAPES["70b"]["vocab_size"] == 128256


def test_lazy_prune_of_the_synthetic_checkpoint(tmp_path):
    write_checkpoint(tmp_path / "m", blocks=4, shape="tiny", seed=1, shard_bytes=100_000, log=lambda *_: None)
    def sglp(*argv):
        return subprocess.run([sys.executable, "-m", "sglp_fast.cli", *map(str, argv)], capture_output=True,
                              text=True, timeout=300, env={**__import__("os").environ, "TRITON_INTERPRET": "1"})

    run = sglp("prune", tmp_path / "m", "--lazy", "--remove", 1, "--calib-seqs", 4, "--seq-len", 32,
               "--verify-windows", 2, "--map-policy", "fixed", "--eval-seqs", 2, "-q", "-o", tmp_path / "out", "--json")
    assert run.returncode == 0, run.stderr
    res = json.loads(run.stdout)["result"]
    # the streamed perplexity (never materialized, maps folded on each read) == the in-memory model's
    mem = sglp("apply", tmp_path / "out" / "plan.json", tmp_path / "m", "--eval-seqs", 2, "--seq-len", 32, "-q",
               "-o", tmp_path / "mem", "--json")
    assert mem.returncode == 0, mem.stderr
    ref = json.loads(mem.stdout)["result"]
    assert res["perplexity_before"] == pytest.approx(ref["perplexity_before"], rel=1e-5)
    assert res["perplexity_after"] == pytest.approx(ref["perplexity_after"], rel=1e-5)
    assert res["perplexity_after"] != pytest.approx(res["perplexity_before"], rel=1e-3)  # the pruning shows
    assert res["compensated"]  # so the fold-on-read path was the one measured (seed 1 gives a compensated plan)
    assert len(res["removed"]) == 1
    # bytes read per stage, against the checkpoint's own tensor sizes (bf16 on disk)
    sizes = {n: torch.Size(shape).numel() * 2 for n, shape, _ in tensor_specs(config_for("tiny", 4))}
    blocks = sum(v for n, v in sizes.items() if ".layers." in n)
    removed = sum(v for n, v in sizes.items() if f".layers.{res['removed'][0]}." in n)
    reads = res["bytes_read"]
    assert reads["load"] == sum(sizes.values()) - blocks  # embedding, final norm, head: read once, eagerly
    assert reads["calibrate"] == blocks  # the pass reads every block exactly once
    assert reads["save"] == sum(sizes.values()) - removed  # the streamed save reads the kept tensors only
    # the search: the statistics pass (the blocks before the candidate runs), one pass for the plain and
    # cross-fitted variants of every candidate, one for the kept plan's saved-model loss (from its first
    # block): each block at most once per round; 1.5x the blocks here (the wave-1 search read 3.5x)
    assert 0 < reads["plan"] <= 2 * blocks and res["checkpoint_bytes"] >= sum(sizes.values())
    assert reads["eval"] == 2 * blocks - removed  # before: every block; after: the kept ones


def test_numbers_drawn_on_a_device_keep_the_layout_and_scale():
    """make_tensor(device=...): the tensor on the CPU in bf16, the same shape and scale, deterministic; on the
    CPU exactly what the default draws (a GPU draws other numbers, as deterministic: checked where there is one)."""
    from make_synthetic import make_tensor

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        a, b = (make_tensor("model.layers.0.mlp.up_proj.weight", (300, 257), 0.5, 3, device) for _ in range(2))
        assert a.dtype == torch.bfloat16 and a.device.type == "cpu" and a.shape == (300, 257)
        assert torch.equal(a, b) and abs(float(a.float().std()) - 0.5) < 0.01
    assert torch.equal(make_tensor("x", (70, 9), 2.0, 1), make_tensor("x", (70, 9), 2.0, 1, "cpu"))
    assert not torch.equal(make_tensor("x", (70, 9), 2.0, 1), make_tensor("y", (70, 9), 2.0, 1))
