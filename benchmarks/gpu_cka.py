"""GPU benchmark: CKA over L=80 layers, d=8192, bf16 activations, n in {1024, 4096} tokens per batch.

Times, on one batch (all L layers, batch-major ``update``):
  triton   CKAAccumulator(backend="triton"): bf16 Gram panels on tensor cores (fp32 accumulation) + split-K
           stacked products (kernels/gram.py, kernels/hsic.py)
  torch    CKAAccumulator(backend="torch"): the same math with torch matmuls in float32 (the torch backend's
           compute dtype; no tf32)
  naive    pairwise CKA as the common PyTorch CKA libraries do it: for every pair, two Grams (bf16 matmul,
           as those libraries would on bf16 inputs) centered in fp32; timed on a sample of pairs and
           extrapolated to all L(L-1)/2 pairs (said so in the table)
and the Gram kernel alone against cuBLAS: the same panel shape through torch.mm in bf16, and an
8192³ bf16 matmul (the device's measured peak-ish rate). FLOPs: Gram 2·rows·n·d per layer panel,
stacked products 2·L²·n² (the kernel skips the lower block triangle; counted in full). It also checks that
a second triton run gives bit-identical HSIC sums (the split-K reduction uses no atomics).

Usage: python3 benchmarks/gpu_cka.py [--out results.md]   (needs CUDA; exits 2 without it)
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time

import torch


def sync_time(fn, reps: int, warmup: int = 1) -> float:
    """Median wall seconds of fn() with device synchronization (for multi-launch end-to-end paths)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def naive_pair(xi: torch.Tensor, xj: torch.Tensor) -> float:
    """Linear CKA of one pair the pairwise way: two Grams, each centered, three Frobenius products."""
    def centered(x):
        k = (x @ x.T).float()
        k = k - k.mean(0, keepdim=True)
        return k - k.mean(1, keepdim=True)

    ki, kj = centered(xi), centered(xj)
    return float((ki * kj).sum() / ((ki * ki).sum().sqrt() * (kj * kj).sum().sqrt()))


def check_large_offsets() -> list[str]:
    """Kernels on tensors whose element offsets pass 2³¹ (64-bit indexing), against float64 torch."""
    from sglp_fast.kernels.gram import gram_panel
    from sglp_fast.kernels.hsic import hsic_accumulate

    dev = torch.device("cuda")
    x = torch.randn(65536, 64, device=dev, dtype=torch.bfloat16)
    start, rows = 20000, 40000  # rows·n = 2.6e9 elements in the output panel
    k, diag, rowsum = gram_panel(x, start, rows)
    picks = torch.tensor([0, rows // 2, rows - 1], device=dev)
    ref = x[start + picks].double() @ x.double().T
    ref[torch.arange(3, device=dev), start + picks] = 0.0
    err_k = float((k[picks].double() - ref).norm() / ref.norm())
    err_r = float((rowsum[picks].double() - ref.sum(1)).norm() / ref.sum(1).norm())
    del k, diag, rowsum, x
    torch.cuda.empty_cache()
    f = torch.randn(80, 1 << 25, device=dev)  # L·m = 2.7e9 elements
    g = hsic_accumulate(f)
    ref_g = torch.zeros(80, 80, device=dev, dtype=torch.float64)
    for c in range(0, f.shape[1], 1 << 22):
        part = f[:, c:c + (1 << 22)].double()
        ref_g += part @ part.T
    err_g = float((g.double() - ref_g).norm() / ref_g.norm())
    del f, g
    torch.cuda.empty_cache()
    return [f"64-bit offsets: gram panel 40000×65536 (bf16 in) rel err rows {err_k:.1e}, row sums "
            f"{err_r:.1e}; "
            f"hsic 80×2^25 rel err {err_g:.1e}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the markdown table here too")
    parser.add_argument("--layers", type=int, default=80)
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--naive-pairs", type=int, default=6)
    parser.add_argument("--profile", default=None, help="write a torch.profiler kernel table of one triton "
                        "update per n to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_cka.py: no CUDA device; nothing to measure", file=sys.stderr)
        return 2
    import triton.testing

    from sglp_fast.similarity.accumulator import CKAAccumulator
    from sglp_fast.kernels.gram import gram_panel

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    L, d = args.layers, args.width
    lines = [f"# CKA on GPU ({name})", "",
             f"Date: {datetime.date.today().isoformat()}; torch {torch.__version__}, triton "
             f"{__import__('triton').__version__}; L={L}, d={d}, bf16 activations, one batch, batch-major "
             "update.",
             ""]

    # cuBLAS bf16 reference rate on random data
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    cublas_peak = 2 * 8192**3 / (ms * 1e-3) / 1e12
    del a, b
    lines += [f"cuBLAS bf16 8192x8192x8192 matmul: {cublas_peak:.0f} TFLOP/s (median)", ""]

    rows_out = []
    for n in args.tokens:
        g = torch.Generator(device=dev).manual_seed(n)
        base = torch.randn(n, d, device=dev, generator=g, dtype=torch.float32)
        xs = []
        for _ in range(L):  # correlated layers, like a residual stream
            base = base + 0.3 * torch.randn(n, d, device=dev, generator=g)
            xs.append(base.to(torch.bfloat16))
        del base

        # --- Gram kernel alone vs cuBLAS on the same panel shape (rows = the accumulator's panel height)
        acc_t = CKAAccumulator(num_layers=L, backend="triton")
        rows = acc_t._panel_rows(n, dev, 4)
        stack = torch.stack(xs[:8])
        out = torch.empty((8, rows, n), device=dev, dtype=torch.float32)
        ms_gram = triton.testing.do_bench(lambda: gram_panel(stack, 0, rows, out=out), warmup=25, rep=200,
                                          return_mode="median")
        gram_tflops = 8 * 2 * rows * n * d / (ms_gram * 1e-3) / 1e12
        x0 = xs[0]
        ms_cub = triton.testing.do_bench(lambda: torch.mm(x0[:rows], x0.T), warmup=25, rep=200,
                                         return_mode="median")
        cub_tflops = 2 * rows * n * d / (ms_cub * 1e-3) / 1e12
        del stack, out

        # --- end to end
        def run(backend):
            acc = CKAAccumulator(num_layers=L, backend=backend)
            acc.update(xs)
            return acc

        t_prep = sync_time(lambda: acc_t._prepare_all(xs, "triton"), reps=3)
        t_triton = sync_time(lambda: run("triton"), reps=3)
        first = run("triton")
        res_triton = first.result()
        repeat_same = bool((run("triton").hsic() == first.hsic()).all())  # no atomics: the same bits
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                run("triton")
                torch.cuda.synchronize()
            with open(args.profile, "a") as fh:
                fh.write(f"\n=== n={n} ===\n")
                for key in ("self_cuda_time_total", "self_device_time_total", "cpu_time_total"):
                    try:
                        fh.write(prof.key_averages().table(sort_by=key, row_limit=15) + "\n")
                        break
                    except Exception:  # the sort key's name changed across torch versions
                        continue
        t_torch = sync_time(lambda: run("torch"), reps=2)
        res_torch = run("torch").result()
        max_diff = float(abs(res_triton - res_torch).max())

        pairs = [(i, (i * 37 + 11) % L) for i in range(args.naive_pairs)]
        naive_pair(xs[0], xs[1])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i, j in pairs:
            naive_pair(xs[i], xs[j])
        torch.cuda.synchronize()
        t_naive = (time.perf_counter() - t0) / len(pairs) * (L * (L - 1) // 2)

        flops = L * 2 * n * n * d + 2 * L * L * n * n
        rows_out.append((n, rows, gram_tflops, cub_tflops, t_triton, flops / t_triton / 1e12, t_torch,
                         t_naive,
                         max_diff, t_prep, repeat_same))
        print(f"n={n}: gram {gram_tflops:.0f} TFLOP/s (cuBLAS same shape {cub_tflops:.0f}); triton "
              f"{t_triton*1e3:.1f} ms (centering/checks {t_prep*1e3:.1f} ms), torch {t_torch*1e3:.1f} ms, "
              f"naive ~{t_naive:.2f} s; |Δ| {max_diff:.2e}; repeat bit-identical {repeat_same}",
              flush=True)
        del xs
        torch.cuda.empty_cache()

    lines += ["| n | panel rows | Triton Gram TFLOP/s | cuBLAS bf16 same shape | Gram vs 8192³ cuBLAS | "
              "triton end-to-end | of which centering+checks | e2e TFLOP/s | torch (fp32) end-to-end | "
              "naive pairwise (extrap.) | triton vs torch | triton vs naive | max abs ΔCKA triton-torch | "
              "triton rerun bit-identical |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, rows, gt, ct, tt, et, to, tn, md, tp, same in rows_out:
        lines.append(f"| {n} | {rows} | {gt:.0f} | {ct:.0f} | {gt / cublas_peak:.0%} | {tt*1e3:.1f} ms | "
                     f"{tp*1e3:.1f} ms | {et:.0f} | "
                     f"{to*1e3:.1f} ms | {tn:.2f} s | {to / tt:.1f}x | {tn / tt:.0f}x | {md:.1e} | {same} |")
    big = check_large_offsets()  # after the timings: its 10 GB buffers must not heat the card before them
    lines += ["", *big]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
