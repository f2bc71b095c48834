"""Calibration on a GPU: a SmolLM2-135M-shaped llama (random weights: throughput does not depend on them),
resident on the GPU vs streamed block by block from CPU vs lazy from safetensors with the activation cache on
disk. Tokens/s and peak GPU memory (torch.cuda.max_memory_allocated). Writes results/calibrate_gpu.md.

Run on a CUDA machine: ``python -m pytest benchmarks/bench_calibrate_gpu.py -q``.
"""
from __future__ import annotations

import os
import tempfile

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "calibrate_gpu.md")
BATCHES, BATCH, SEQ = 8, 4, 512
_rows: list[dict] = []

pytestmark = pytest.mark.gpu


def smollm2_like(dtype):
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(cfg).to(dtype).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("smollm2like"))
    smollm2_like(torch.float32).save_pretrained(d, max_shard_size="100MB")
    return d


def _batches():
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 49152, (BATCH, SEQ), generator=g)} for _ in range(BATCHES)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["resident", "streamed", "lazy+disk"])
def test_calibrate_gpu(benchmark, saved, variant, dtype):
    from sglp_fast.calibration.runtime import calibrate
    from sglp_fast.models import load_model

    if variant == "resident":
        model = smollm2_like(dtype).cuda()
        kw = {}
    elif variant == "streamed":
        model = smollm2_like(dtype)
        kw = dict(device="cuda")
    else:
        model, _ = load_model(saved, dtype=dtype, lazy=True)
        kw = dict(device="cuda", dtype=dtype, max_device_memory="256MiB", max_cpu_memory=0,
                  offload_dir=tempfile.mkdtemp(prefix="sglp-gpu-"))
    batches = _batches()
    calibrate(model, batches[:1], progress=False, **kw)  # warm-up (CUDA context, kernels)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    res = benchmark.pedantic(lambda: calibrate(model, batches, progress=False, **kw), rounds=1, iterations=1)
    torch.cuda.synchronize()
    row = dict(variant=variant, dtype=str(dtype).replace("torch.", ""), tokens=res.tokens,
               fwd=res.timings["tokens_per_s_forward"], bwd=res.timings["tokens_per_s_backward"],
               total=res.timings["total_s"], peak=torch.cuda.max_memory_allocated(), disk=res.cache_peak_bytes["disk"])
    benchmark.extra_info.update(row)
    _rows.append(row)


@pytest.fixture(scope="module", autouse=True)
def write_results():
    yield
    if not _rows:
        return
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "?"
    lines = [
        "# Calibration runtime on a GPU (benchmarks/bench_calibrate_gpu.py)",
        "",
        f"Date: 2026-11-25. Machine: {name} (lent device machine, 16 CPU cores), torch {torch.__version__}. "
        f"SmolLM2-135M-shaped llama (30 blocks, hidden 576, vocab 49152, random weights), {BATCHES} batches x "
        f"[{BATCH}, {SEQ}] tokens, forward + loss + layer-wise backward (GradNorm), single timed run after a warm-up.",
        "",
        "| weights | dtype | forward tok/s | loss+backward tok/s | total s | peak GPU MiB | cache on disk MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in _rows:
        lines.append(f"| {r['variant']} | {r['dtype']} | {r['fwd']:.0f} | {r['bwd']:.0f} | {r['total']:.2f} | "
                     f"{r['peak'] / 2**20:.0f} | {r['disk'] / 2**20:.0f} |")
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as fh:
        fh.write("\n".join(lines) + "\n")
