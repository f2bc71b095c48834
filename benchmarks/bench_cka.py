"""CPU benchmark: our streaming CKA vs naive pairwise CKA (two centered Grams per pair), L=30, d=576.

The naive provider is written the way the common PyTorch CKA libraries compute an L×L matrix: for every pair
(i, j) build both Grams, center them (HKH, done with means here, which is cheaper than their n×n matmuls)
and take three Frobenius products: L(L-1)/2 pairs × 2 Grams = (L-1)× more Gram work than one Gram per
layer. Ours: ``CKAAccumulator(backend="torch")`` (the path that runs on CPU), one update with all layers.

FLOPs in extra_info: ours 2·L·n²·d (Grams) + 2·L²·n² (stacked products); naive 2·L(L-1)·n²·d.
Run: .venv/bin/python -m pytest benchmarks/bench_cka.py --benchmark-only -q
Writes benchmarks/results/cka_cpu.md with the ratios measured in this one run.
"""
from __future__ import annotations

import datetime
import os
import platform

import numpy as np
import pytest
import torch

from sglp_fast.similarity.accumulator import CKAAccumulator

# One thread for both providers: this box has 2 cores shared by several jobs, and with 2 threads under that
# contention every small parallel elementwise op waits ~16 ms at an OpenMP barrier (measured on a 256×576
# mean: 16 ms with 2 threads, 0.04 ms with 1), which would swamp both providers with noise.
torch.set_num_threads(1)

L, D = 30, 576
SIZES = [256, 1024, 2048]
RESULTS: dict = {}
OUT = os.path.join(os.path.dirname(__file__), "results", "cka_cpu.md")


def layers(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, D, generator=g)
    out = []
    for _ in range(L):
        x = x + 0.3 * torch.randn(n, D, generator=g)
        out.append(x.clone())
    return out


def naive_pairwise_cka(xs: list[torch.Tensor]) -> np.ndarray:
    def centered_gram(x):
        k = x @ x.T
        k = k - k.mean(0, keepdim=True)
        return k - k.mean(1, keepdim=True)

    cka = np.eye(len(xs))
    for i in range(len(xs)):
        for j in range(i + 1, len(xs)):
            ki, kj = centered_gram(xs[i]), centered_gram(xs[j])
            cka[i, j] = cka[j, i] = float((ki * kj).sum() / ((ki * ki).sum().sqrt() * (kj * kj).sum().sqrt()))
    return cka


def ours(xs: list[torch.Tensor]) -> np.ndarray:
    acc = CKAAccumulator(num_layers=len(xs), backend="torch", estimator="biased")
    acc.update(xs)
    return acc.result()


@pytest.fixture(scope="module", autouse=True)
def write_results():
    yield
    if not RESULTS:
        return
    lines = ["# CKA on CPU: streaming engine vs naive pairwise", "",
             f"Date: 2026-11-25 (run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC); "
             f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with "
             f"other jobs), torch {torch.__version__}, torch threads: {torch.get_num_threads()}; L={L}, "
             f"d={D}, fp32, one batch.",
             "Biased linear CKA (what the pairwise libraries compute); medians of pytest-benchmark rounds",
             "(ours: 3 rounds; naive: 3 rounds at n=256, 1 round above). One thread for both: on this",
             "shared 2-core box, 2 threads under contention made every small parallel elementwise op wait",
             "~16 ms at an OpenMP barrier (256×576 mean: 16 ms with 2 threads vs 0.04 ms with 1).",
             "Target >= 10x.", "",
             "| n | ours (s) | naive pairwise (s) | speed-up | max abs ΔCKA |", "|---|---|---|---|---|"]
    for n in SIZES:
        r = RESULTS.get(n, {})
        if "ours" in r and "naive" in r:
            lines.append(f"| {n} | {r['ours']:.3f} | {r['naive']:.3f} | {r['naive'] / r['ours']:.1f}x | "
                         f"{r.get('diff', float('nan')):.1e} |")
    with open(OUT, "w") as fh:
        fh.write("\n".join(lines) + "\n")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("provider", ["ours", "naive"])
def test_cka_cpu(benchmark, provider, n):
    xs = layers(n)
    fn = ours if provider == "ours" else naive_pairwise_cka
    flops = 2 * L * n * n * D + 2 * L * L * n * n if provider == "ours" else 2 * L * (L - 1) * n * n * D
    benchmark.extra_info.update({"flops": flops, "L": L, "d": D, "n": n})
    rounds = 3 if (provider == "ours" or n <= 256) else 1
    result = benchmark.pedantic(fn, args=(xs,), rounds=rounds, iterations=1, warmup_rounds=0)
    RESULTS.setdefault(n, {})[provider] = benchmark.stats.stats.median
    RESULTS[n][f"res_{provider}"] = result
    if "res_ours" in RESULTS[n] and "res_naive" in RESULTS[n]:
        RESULTS[n]["diff"] = float(np.abs(RESULTS[n]["res_ours"] - RESULTS[n]["res_naive"]).max())
        assert RESULTS[n]["diff"] <= 1e-4  # same quantity, or the timing compares different things
