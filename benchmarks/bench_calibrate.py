"""Calibration throughput and peak memory: SmolLM2-135M in memory vs offloaded; depth scaling of peak RSS.

Run: ``.venv/bin/python -m pytest benchmarks/bench_calibrate.py -q -p no:randomly`` (a few minutes on 2
shared cores). Writes benchmarks/results/calibrate_cpu.md. Sizes are modest on purpose: this box has 2 CPU
cores shared with other jobs, so absolute numbers are noisy; ratios are what to read.

Variants (same 2 x [1, 128] token calibration set, fp32, CPU):
* ``hf_reference``: the plain transformers model, its own forward (and full autograd of the same CE loss):
  the yardstick for the box's speed at the time of the run.
* ``in_memory``: the model loaded whole (fast path: blocks resident, activations in RAM).
* ``offloaded``: skeleton on meta, each block read from the safetensors shards on demand, activation cache
  forced to disk (``max_cpu_memory=0``, ``offload_dir``).
Each runs forward only (``gradients=False``) and forward + loss + layer-wise backward (GradNorm).
Peak RSS is measured in a fresh subprocess per variant (VmHWM), so runs do not share a high-water mark.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results", "calibrate_cpu.md")
BATCHES, SEQ = 2, 128
_rows: dict = {}


def _batches(vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, vocab, (1, SEQ), generator=g)} for _ in range(BATCHES)]


def run_variant(directory: str, variant: str, gradients: bool) -> dict:
    """One calibration run; returns timings and this process's peak RSS."""
    import torch

    from sglp_fast.calibration.runtime import calibrate
    from sglp_fast.models import load_model
    from test_memory_depth import peak_rss

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if variant == "hf_reference":
        return _hf_reference(directory, gradients)
    lazy = variant == "offloaded"
    model, _ = load_model(directory, lazy=lazy)
    kw = {}
    off = None
    if lazy:
        off = tempfile.mkdtemp(prefix="sglp-bench-")
        kw = dict(max_cpu_memory=0, offload_dir=off)
    res = calibrate(model, _batches(model.config.vocab_size), gradients=gradients, progress=False, **kw)
    t = res.timings
    return {
        "variant": variant, "gradients": gradients, "tokens": res.tokens, "loss": res.loss,
        "fwd_tok_s": t["tokens_per_s_forward"], "bwd_tok_s": t.get("tokens_per_s_backward"),
        "total_s": t["total_s"], "peak_rss": peak_rss(),
        "cache_peak": res.cache_peak_bytes,
    }


def _hf_reference(directory: str, gradients: bool) -> dict:
    """The plain transformers model on the same batches: full forward, and full autograd for the same loss."""
    import time

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from test_memory_depth import peak_rss

    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    batches = _batches(model.config.vocab_size)
    tokens = sum(b["input_ids"].numel() for b in batches)
    model.requires_grad_(gradients)
    t_fwd = t_bwd = 0.0
    t_start = time.perf_counter()
    for b in batches:
        t0 = time.perf_counter()
        with torch.set_grad_enabled(gradients):
            logits = model(**b, use_cache=False).logits
        t_fwd += time.perf_counter() - t0
        if gradients:
            t0 = time.perf_counter()
            ids = b["input_ids"]
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
            loss.backward()
            t_bwd += time.perf_counter() - t0
    return {"variant": "hf_reference", "gradients": gradients, "tokens": tokens, "loss": None,
            "fwd_tok_s": tokens / t_fwd, "bwd_tok_s": tokens / t_bwd if gradients else None,
            "total_s": time.perf_counter() - t_start, "peak_rss": peak_rss(), "cache_peak": {"disk": 0}}


def _subprocess(*args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M converted once from the packaged GGUF to a sharded safetensors folder."""
    from sglp_fast.models import load_model

    d = str(tmp_path_factory.mktemp("smollm2"))
    model, tok = load_model(None)
    model.save_pretrained(d, max_shard_size="100MB")
    return d


@pytest.mark.parametrize("gradients", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("variant", ["hf_reference", "in_memory", "offloaded"])
def test_calibrate_smollm2(benchmark, smollm2_dir, variant, gradients):
    stats = _subprocess("variant", smollm2_dir, variant, str(int(gradients)))  # peak RSS, fresh process
    benchmark.extra_info.update(stats)
    benchmark.extra_info["flops_forward_approx"] = 2 * 134_515_008 * stats["tokens"]
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    benchmark.pedantic(run_variant, args=(smollm2_dir, variant, gradients), rounds=1, iterations=1)
    _rows[(variant, gradients)] = stats


def test_depth_scaling(benchmark):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_memory_depth import depth_table

    with tempfile.TemporaryDirectory(prefix="sglp-depth-") as tmp:
        table = benchmark.pedantic(depth_table, args=(tmp, (8, 16, 32)), rounds=1, iterations=1)
    benchmark.extra_info["table"] = table
    _rows["depth"] = table


def _mib(n) -> str:
    return f"{n / 2**20:.0f}"


@pytest.fixture(scope="module", autouse=True)
def write_results():
    yield
    if not _rows:
        return
    lines = [
        "# Calibration runtime on CPU (benchmarks/bench_calibrate.py)",
        "",
        f"Date: 2026-11-25 (run {datetime.datetime.utcnow():%H:%M} UTC). Machine: {platform.machine()}, "
        f"{os.cpu_count()} CPU cores shared with 3 other jobs, no GPU, torch {__import__('torch').__version__}, "
        "fp32. Numbers are from single runs on a busy box: read the ratios, not the absolute rates.",
        "",
        f"## SmolLM2-135M (30 blocks, hidden 576), {BATCHES} batches x {SEQ} tokens",
        "",
        "Rates come from the subprocess runs (one each); `hf_reference` is plain transformers on the same batches "
        "(forward; full autograd of the same loss), measured the same way as the yardstick.",
        "",
        "| variant | pass | forward tok/s | loss+backward tok/s | total s | peak RSS MiB | cache on disk MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for (variant, grads), s in sorted((k, v) for k, v in _rows.items() if k != "depth"):
        bwd = "-" if s["bwd_tok_s"] is None else f"{s['bwd_tok_s']:.0f}"
        lines.append(
            f"| {variant} | {'forward+backward' if grads else 'forward'} | {s['fwd_tok_s']:.0f} | {bwd} | "
            f"{s['total_s']:.2f} | {_mib(s['peak_rss'])} | {_mib(s['cache_peak']['disk'])} |"
        )
    if "depth" in _rows:
        t = _rows["depth"]
        lines += [
            "",
            "## Peak RSS vs depth (llama-like, hidden 1024, intermediate 256, fp32, safetensors; 2 x 16 tokens)",
            "",
            "Full = `from_pretrained` + one forward; offloaded = `load_model(lazy=True)` + calibrate with GradNorm.",
            "Each cell is a fresh subprocess; baseline RSS after imports is ~"
            f"{_mib(t[min(t)]['full']['baseline_rss'])} MiB.",
            "",
            "| blocks | weights MiB | full peak RSS MiB | offloaded peak RSS MiB |",
            "|---|---|---|---|",
        ]
        for depth in sorted(t):
            full, off = t[depth]["full"], t[depth]["offload"]
            lines.append(f"| {depth} | {_mib(4 * full['params'])} | {_mib(full['peak_rss'])} | {_mib(off['peak_rss'])} |")
        lo, hi = min(t), max(t)
        lines += [
            "",
            f"From {lo} to {hi} blocks the offloaded peak grows "
            f"{100 * (t[hi]['offload']['peak_rss'] / t[lo]['offload']['peak_rss'] - 1):.1f}%, the full model's "
            f"{100 * (t[hi]['full']['peak_rss'] / t[lo]['full']['peak_rss'] - 1):.1f}% "
            f"(its weights grow {t[hi]['full']['params'] / t[lo]['full']['params']:.1f}x).",
        ]
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    _, mode, directory, variant, grads = sys.argv
    print(json.dumps(run_variant(directory, variant, bool(int(grads)))))
