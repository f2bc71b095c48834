"""Peak RSS of the offloaded (lazy safetensors) calibration is flat in depth; loading the full model is not.

Each measurement runs in a fresh subprocess (peak RSS is per process). Run this file as a script for the
worker: ``python tests/test_memory_depth.py {full|offload} DIR`` prints one JSON line.
The exact figures live in benchmarks/results/calibrate_cpu.md (benchmarks/bench_calibrate.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HIDDEN = 1024
TOKENS = (2, 16)  # batch, seq: activations are negligible next to one block's weights


def _rss_now() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that across fork+exec, so a child of a
    big parent would report the parent's high-water mark."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def save(directory: str, layers: int) -> None:
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=HIDDEN, intermediate_size=256, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64)
    with torch.no_grad():
        tf.LlamaForCausalLM(cfg).save_pretrained(directory, max_shard_size="200MB")


def measure(mode: str, directory: str) -> dict:
    import torch
    import transformers as tf

    from sglp_fast.calibration.runtime import calibrate
    from sglp_fast.models import load_model

    base = _rss_now()
    if mode == "full":
        # from_pretrained may leave weights memory-mapped and untouched: run the forward so every weight is read
        model = tf.AutoModelForCausalLM.from_pretrained(directory)
        n = sum(p.numel() for p in model.parameters())
        ids = torch.randint(0, 256, TOKENS, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            model(ids, use_cache=False)
    else:
        model, _ = load_model(directory, lazy=True)
        ids = torch.randint(0, 256, TOKENS, generator=torch.Generator().manual_seed(0))
        calibrate(model, [{"input_ids": ids}], progress=False)
        n = None
    return {"mode": mode, "baseline_rss": base, "peak_rss": peak_rss(), "params": n}


def _worker(*args: str) -> dict | None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(__file__)),
                                                         os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    return json.loads(line) if line.startswith("{") else None


def depth_table(tmp: str, depths=(8, 32)) -> dict[int, dict[str, dict]]:
    """{L: {"full": {...}, "offload": {...}}} measured in fresh subprocesses."""
    table = {}
    for depth in depths:
        d = os.path.join(tmp, f"L{depth}")
        save(d, depth)  # in this process: saves two interpreter start-ups
        table[depth] = {mode: _worker(mode, d) for mode in ("full", "offload")}
    return table


@pytest.mark.slow
def test_offloaded_peak_rss_is_flat_in_depth(tmp_path):
    t = depth_table(str(tmp_path))
    print(json.dumps(t))
    off8, off32 = t[8]["offload"]["peak_rss"], t[32]["offload"]["peak_rss"]
    full8, full32 = t[8]["full"]["peak_rss"], t[32]["full"]["peak_rss"]
    extra_weight_bytes = 4 * (t[32]["full"]["params"] - t[8]["full"]["params"])  # fp32
    assert off32 < 1.25 * off8, t  # offloaded: < 25% growth for 4x the depth
    # the full model's peak grows by (most of) its extra weights, so the measurement can tell the two apart
    assert full32 - full8 > 0.75 * extra_weight_bytes, t
    assert off32 - off8 < 0.15 * extra_weight_bytes, t


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], sys.argv[2])))
