"""A 70B-shaped checkpoint on one GPU (issue 12): peak GPU memory, seconds per block per stage, the block
forward's model FLOP utilization, and the extrapolation to Llama-3-70B's 80 blocks. One command, with a time
guard (default 480 s, checkpoint included):

    python benchmarks/gpu_70b.py [--scratch DIR] [--blocks 16] [--time-limit 480]    (~32 GB of disk)
    python benchmarks/gpu_70b.py --tiny --out /tmp/r.md --json /tmp/r.json           (the same flow on the CPU, < 60 s)

Steps:
1. the checkpoint: benchmarks/make_synthetic.py (random bf16, Llama-3-70B shapes, --blocks blocks);
2. a child process, killed at the time limit (what it measured by then is kept and reported):
   a. the bf16 matmul rate: torch.matmul of 8192 x 8192 matrices (the reference for MFU);
   b. one block's forward, timed alone: the checkpoint's block 0 on the device, 2048-token windows, as many per
      call as calibration groups (``runtime.default_windows_per_call``) and one per call; FLOPs counted
      analytically (``block_forward_flops``) -> MFU = FLOPs / time / matmul rate (goal >= 40%);
   c. the pipeline: ``sglp_fast.analyze(lazy=True)`` with --max-memory 24GiB, 128 x 2048 calibration tokens,
      the default scorer (verified, compensated), 25% of the blocks removed: its stage timings, the bytes each
      stage read, the peak GPU memory (torch.cuda.max_memory_allocated / reserved; goal < 24 GiB);
3. the report, benchmarks/results/scale_gpu.md (device, date, every number and the goals): seconds per block
   per stage and the 80-block extrapolation (goal: a full 70B plan in < 1 h).

Why the API in a child and not `sglp prune` in a subprocess: the goal is the plan (the saved model would be
~30 GB more disk on a 64 GB machine), and torch's peak-memory counters can only be read inside the process.
The stage timings are the ones `sglp prune --json` prints (the same ``Analysis.timings``). The calibration
tokens are random ids: throughput does not depend on them, and the built-in text is shorter than 128 x 2048.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_synthetic import config_for, tensor_specs, write_checkpoint  # noqa: E402

GiB = 2**30
TARGET_BLOCKS = 80  # Llama-3-70B
LOG_TAIL_LINES = 30  # of the child's log, in the report of a run that did not complete
GOALS = {"peak_gib": 24.0, "mfu": 0.40, "plan_80_s": 3600.0}
FULL = dict(shape="70b", blocks=16, windows=128, seq_len=2048, dtype="bfloat16", device="cuda",
            max_memory=24 * GiB, matmul_n=8192, reps=5, time_limit=480.0)
TINY = dict(shape="tiny", blocks=4, windows=8, seq_len=64, dtype="float32", device="cpu", max_memory=None,
            matmul_n=256, reps=3, time_limit=55.0)


# --- FLOPs ------------------------------------------------------------------------------------------------
def block_forward_flops(cfg, seq_len: int, causal: bool = True) -> int:
    """Multiply-add FLOPs (2 per MAC) of one Llama block's forward over one window of ``seq_len`` tokens.

    Projections q, k, v, o and the MLP's gate, up, down (2 x tokens x in x out each), and attention: scores
    QK^T and the weighted sum PV. ``causal``: each query attends to the keys up to its own position (what a
    causal flash kernel computes: s(s+1)/2 pairs); False counts the full s x s square (what torch's
    FlopCounterMode counts for scaled_dot_product_attention). Norms, rotary and SiLU are not counted.
    """
    d, f = cfg.hidden_size, cfg.intermediate_size
    hd = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    s = seq_len
    projections = 2 * s * d * (q + 2 * kv) + 2 * s * q * d
    mlp = 3 * 2 * s * d * f
    pairs = s * (s + 1) // 2 if causal else s * s
    attention = 2 * 2 * pairs * q  # QK^T and PV: 2 FLOPs per MAC, head_dim x heads per query-key pair
    return projections + mlp + attention


# --- measurements, in the child process ---------------------------------------------------------------------
def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, reps: int, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` (device synchronized)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_matmul(device: str, dtype: str, n: int, reps: int) -> dict:
    """The dense matmul rate the MFU is measured against: torch.matmul of two n x n matrices."""
    import torch

    dt = getattr(torch, dtype)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dt, generator=g)
    b = torch.randn(n, n, device=device, dtype=dt, generator=g)
    secs = _timed(lambda: torch.matmul(a, b), device, reps=max(reps, 5), warmup=2)
    return {"n": n, "dtype": dtype, "seconds": secs, "flops_per_s": 2 * n**3 / secs}


def measure_block(model_dir: str, device: str, dtype: str, windows: int, seq_len: int, max_memory, reps: int) -> dict:
    """One block's forward alone: block 0 read to the device, ``windows_per_call`` windows per call (as
    calibration groups them) and one window per call."""
    import torch

    from sglp_fast.calibration.runtime import default_windows_per_call
    from sglp_fast.calibration.weights import BlockWeights, NonBlockModules
    from sglp_fast.models import get_adapter, load_model

    dt = getattr(torch, dtype)
    model, _ = load_model(model_dir, dtype=dt, lazy=True)
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, adapter.config.vocab_size, (1, seq_len), generator=g)}
               for _ in range(windows)]
    k = default_windows_per_call(adapter, batches, device, dt, max_memory, prefetch=True)
    weights = BlockWeights(adapter, torch.device(device), dt, prefetch=False)
    ids = torch.cat([b["input_ids"] for b in batches[:k]]).to(device)
    with torch.no_grad():
        with NonBlockModules(adapter, torch.device(device), dt):
            hidden, calls = adapter.capture_block_calls({"input_ids": ids})
            hidden1, calls1 = adapter.capture_block_calls({"input_ids": ids[:1]})
        block = weights.acquire(0)
        one = _timed(lambda: adapter.call_block(block, hidden1, calls1[0]), device, reps)
        many = _timed(lambda: adapter.call_block(block, hidden, calls[0]), device, reps)
        weights.release(0, block)
    return {"windows_per_call": k, "seq_len": seq_len, "seconds_one_window": one, "seconds_per_call": many,
            "flops_per_window": block_forward_flops(adapter.config, seq_len)}


def run_pipeline(model_dir: str, device: str, dtype: str, windows: int, seq_len: int, max_memory, remove: int,
                 offload_dir: str) -> dict:
    """``sglp_fast.analyze`` on the lazy checkpoint: stage timings, bytes read, peak memory."""
    import resource

    import torch

    import sglp_fast

    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    vocab = config_for_dir(model_dir).vocab_size
    ids = torch.randint(0, vocab, (windows, seq_len), generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    analysis = sglp_fast.analyze(model_dir, ids, remove=remove, lazy=True, device=device, dtype=dtype,
                                 max_memory=max_memory, offload_dir=offload_dir, progress=False)
    wall = time.perf_counter() - t0
    try:
        calib = analysis.calib_result
        out = {"wall_s": wall, "timings": dict(analysis.timings), "calibration": dict(calib.timings),
               "cache_peak_bytes": dict(calib.cache_peak_bytes), "memory_plan": calib.memory_plan,
               "removed": list(analysis.plan.removed), "num_blocks": analysis.plan.num_blocks,
               "compensated": analysis.plan.extra.get("compensation") is not None}
    finally:
        analysis.close()
    if cuda:
        out["peak"] = {"kind": "cuda", "allocated": torch.cuda.max_memory_allocated(),
                       "reserved": torch.cuda.max_memory_reserved()}
    else:
        out["peak"] = {"kind": "rss", "allocated": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    return out


def config_for_dir(model_dir: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


def child_main(spec: dict) -> int:
    """Measure phase by phase, one JSON line each (the parent keeps what arrived before a timeout); the
    package's log on stderr, timestamped (a run stopped by the time guard reports its last lines)."""
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    def emit(phase: str, fn, *args) -> None:
        t0 = time.perf_counter()
        value = fn(*args)
        print(json.dumps({"phase": phase, "seconds": time.perf_counter() - t0, "value": value}), flush=True)

    emit("matmul", measure_matmul, spec["device"], spec["dtype"], spec["matmul_n"], spec["reps"])
    emit("block", measure_block, spec["model_dir"], spec["device"], spec["dtype"], spec["windows"], spec["seq_len"],
         spec["max_memory"], spec["reps"])
    emit("pipeline", run_pipeline, spec["model_dir"], spec["device"], spec["dtype"], spec["windows"],
         spec["seq_len"], spec["max_memory"], spec["remove"], spec["offload_dir"])
    return 0


# --- the parent: checkpoint, child under the time guard, derived numbers, report ---------------------------------
def run_child(spec: dict, seconds_left: float) -> tuple[dict, str, list[str]]:
    """The child's phases, how it ended ("completed", "timed out in <phase>", "failed: ...") and, unless it
    completed, the last lines of its log (where a stopped pipeline had got to)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=max(1.0, seconds_left))
        status = "completed" if proc.returncode == 0 else f"failed (exit {proc.returncode}): {stderr.strip()[-2000:]}"
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        status = None
    phases = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            doc = json.loads(line)
            phases[doc["phase"]] = doc
    if status is None:
        pending = next((p for p in ("matmul", "block", "pipeline") if p not in phases), "?")
        status = f"timed out in {pending} (time limit reached)"
    tail = [] if status == "completed" else stderr.strip().splitlines()[-LOG_TAIL_LINES:]
    return phases, status, tail


def derive(spec: dict, phases: dict, checkpoint_s: float) -> dict:
    """Every reported number, computed from the measurements (nothing here is typed in)."""
    out: dict = {"spec": {k: v for k, v in spec.items() if k != "model_dir"}, "checkpoint_s": checkpoint_s}
    rate = phases.get("matmul", {}).get("value", {}).get("flops_per_s")
    out["matmul"] = phases.get("matmul", {}).get("value")
    blk = phases.get("block", {}).get("value")
    if blk and rate:
        k, fw = blk["windows_per_call"], blk["flops_per_window"]
        out["block"] = {**blk, "achieved_flops_per_s": k * fw / blk["seconds_per_call"],
                        "mfu": k * fw / blk["seconds_per_call"] / rate,
                        "mfu_one_window": fw / blk["seconds_one_window"] / rate}
    pipe = phases.get("pipeline", {}).get("value")
    if pipe:
        out["pipeline"] = _pipeline_numbers(spec, pipe, rate, blk)
    return out


def _pipeline_numbers(spec: dict, pipe: dict, rate: float | None, blk: dict | None) -> dict:
    L, t, c = pipe["num_blocks"], pipe["timings"], pipe["calibration"]
    per_block = {"calibrate_forward_s": c["forward_s"] / L, "plan_s": t.get("plan_s", 0.0) / L}
    fixed = {"load_s": t.get("load_s", 0.0), "calibrate_other_s": t["calibrate_s"] - c["forward_s"],
             "other_s": sum(v for k, v in t.items() if k.endswith("_s")  # plan_<part>_s: plan_s's split
                            and k not in ("load_s", "calibrate_s") and not k.startswith("plan_"))}
    plan_80 = sum(fixed.values()) + TARGET_BLOCKS * sum(per_block.values())
    out = {**pipe, "per_block": per_block, "fixed": fixed, "plan_80_s": plan_80,
           "remove_80": round(TARGET_BLOCKS * len(pipe["removed"]) / L)}
    if blk and rate:
        flops = L * spec["windows"] * blk["flops_per_window"]
        out["forward_mfu"] = flops / c["forward_s"] / rate  # the whole calibration forward: observers included
    cfg = config_for(spec["shape"], 1)
    itemsize = 2 if spec["dtype"] in ("bfloat16", "float16") else 4
    slot = spec["windows"] * spec["seq_len"] * cfg.hidden_size * itemsize
    # the compensated search keeps every block's input for every window: (L + 1) slots (cache tiers + disk)
    out["kept_inputs_bytes"] = {"measured_blocks": (L + 1) * slot, "target_blocks": (TARGET_BLOCKS + 1) * slot}
    return out


def _fmt_s(x: float) -> str:
    return f"{x:.1f} s" if x < 600 else f"{x / 60:.1f} min"


def _fmt_rate(flops_per_s: float) -> str:
    return f"{flops_per_s / 1e12:.1f} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:.2f} GFLOP/s"


def _fmt_gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def report_lines(d: dict, device: str, status: str) -> list[str]:
    spec = d["spec"]
    budget = "none" if spec["max_memory"] is None else f"{spec['max_memory'] / GiB:.0f} GiB"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# {spec['shape']}-shaped checkpoint on one device (`benchmarks/gpu_70b.py`{' --tiny' if spec['shape'] == 'tiny' else ''})",
             "", f"Device: {device}. Date: {now}. Run: {status}.", "",
             f"Checkpoint: {spec['blocks']} blocks of `make_synthetic.py --shape {spec['shape']}` (random, bf16 on "
             f"disk), written in {d['checkpoint_s']:.0f} s. Calibration: {spec['windows']} x {spec['seq_len']} "
             f"tokens, compute dtype {spec['dtype']}, max memory {budget}, remove "
             f"{spec['remove']} of {spec['blocks']} blocks, default scorer; spilled caches in "
             f"`{spec['offload_dir']}`.", ""]
    mm = d.get("matmul")
    if mm:
        lines.append(f"Matmul rate ({mm['dtype']}, {mm['n']}^3, torch.matmul): {_fmt_rate(mm['flops_per_s'])}.")
    blk = d.get("block")
    if blk:
        met = "met" if blk["mfu"] >= GOALS["mfu"] else "not met"
        lines += ["", "| block forward (block 0 alone) | windows per call | ms per call | rate | MFU | goal |",
                  "|---|---:|---:|---:|---:|---:|",
                  f"| grouped as calibration groups | {blk['windows_per_call']} | {blk['seconds_per_call'] * 1e3:.1f} | "
                  f"{_fmt_rate(blk['achieved_flops_per_s'])} | {100 * blk['mfu']:.1f}% | >= {100 * GOALS['mfu']:.0f}%: "
                  f"{met} |",
                  f"| one window per call | 1 | {blk['seconds_one_window'] * 1e3:.1f} | "
                  f"{_fmt_rate(blk['flops_per_window'] / blk['seconds_one_window'])} | {100 * blk['mfu_one_window']:.1f}% | |",
                  "", f"FLOPs per {blk['seq_len']}-token window and block: {blk['flops_per_window'] / 1e9:.3f} GFLOP "
                  "(projections, MLP, causal attention; `block_forward_flops`)."]
    pipe = d.get("pipeline")
    if pipe:
        lines += _pipeline_lines(pipe)
    else:
        lines += ["", "Pipeline: not measured (see the run status above)."]
    if d.get("log_tail"):
        lines += ["", "The package's log before the run stopped (last lines):", "", "```", *d["log_tail"], "```"]
    return lines


def _pipeline_lines(p: dict) -> list[str]:
    t, pb, fx, L = p["timings"], p["per_block"], p["fixed"], p["num_blocks"]
    peak = p["peak"]
    if peak["kind"] == "cuda":
        mem = (f"peak GPU memory: {peak['allocated'] / GiB:.2f} GiB allocated, {peak['reserved'] / GiB:.2f} GiB "
               f"reserved (goal < {GOALS['peak_gib']:.0f} GiB: {'met' if peak['reserved'] < GOALS['peak_gib'] * GiB else 'not met'})")
    else:
        mem = f"peak RSS (CPU run): {peak['allocated'] / GiB:.2f} GiB"
    reads = {k[:-len("_bytes_read")]: v for k, v in t.items() if k.endswith("_bytes_read")}
    lines = ["", f"Pipeline (`sglp_fast.analyze`, lazy, {L} blocks): {p['wall_s']:.1f} s; removed {p['removed']}"
             f"{' (compensated)' if p['compensated'] else ''}; {mem}.", "",
             "| stage | seconds | per block | read from disk |", "|---|---:|---:|---:|"]
    for stage in ("load", "tokenize", "calibrate", "cka_result", "segment", "plan"):
        if f"{stage}_s" not in t:
            continue
        per = {"calibrate": pb["calibrate_forward_s"], "plan": pb["plan_s"]}.get(stage)
        lines.append(f"| {stage} | {t[f'{stage}_s']:.1f} | {'' if per is None else f'{per:.2f}'} | "
                     f"{_fmt_gb(reads.get(stage, 0))} |")
    parts = {k[len("plan_"):-len("_s")]: v for k, v in t.items()
             if k.startswith("plan_") and k.endswith("_s") and k != "plan_s"}
    if parts:
        lines += ["", "The plan stage's split (the verified search; `Analysis.timings['plan_<part>_s']`): "
                  + ", ".join(f"{k.replace('_', '-')} {v:.1f} s" for k, v in parts.items())
                  + f"; the rest (candidate scores, bookkeeping) {t['plan_s'] - sum(parts.values()):.1f} s."]
    c = p["calibration"]
    lines += ["", f"Calibration forward: {c['forward_s']:.1f} s, {c['tokens_per_s_forward']:.0f} tokens/s"
              + (f", {100 * p['forward_mfu']:.1f}% MFU over the whole pass (CKA, statistics and cache traffic "
                 "included)" if "forward_mfu" in p else "")
              + f"; {c.get('windows_per_call', 1)} windows per block call; it waited "
              f"{c.get('forward_weights_wait_s', 0.0):.1f} s for block weights (the prefetch hides the rest).",
              "", f"Extrapolation to {TARGET_BLOCKS} blocks (per-block stages x {TARGET_BLOCKS}, the rest as measured; "
              f"remove {p['remove_80']}): **{_fmt_s(p['plan_80_s'])}** for the plan (goal < "
              f"{GOALS['plan_80_s'] / 3600:.0f} h: {'met' if p['plan_80_s'] < GOALS['plan_80_s'] else 'not met'}); "
              f"fixed {sum(fx.values()):.1f} s, per block {sum(pb.values()):.2f} s.",
              "", f"Kept block inputs (the compensated search keeps every block's input for every window): "
              f"{_fmt_gb(p['kept_inputs_bytes']['measured_blocks'])} here, "
              f"{_fmt_gb(p['kept_inputs_bytes']['target_blocks'])} at {TARGET_BLOCKS} blocks (device, pinned "
              "host memory and --offload-dir together). Cache peak here: "
              + ", ".join(f"{k} {_fmt_gb(v)}" for k, v in p["cache_peak_bytes"].items()) + ".",
              "", "Memory plan:", "", "```", p["memory_plan"], "```"]
    return lines


def checkpoint_bytes(shape: str, blocks: int) -> int:
    """Bytes of the bf16 checkpoint make_synthetic writes (its tensors; the index and tokenizer are small)."""
    return sum(2 * math.prod(s) for _, s, _ in tensor_specs(config_for(shape, blocks)))


def default_offload_dir(scratch: Path, tiny: bool, checkpoint_left: int = 0) -> Path:
    """The scratch disk when it keeps 24 GB free beside the checkpoint (``checkpoint_left``: its bytes not yet
    written), else RAM-backed /dev/shm when that has 48 GB; the report says which. Why the disk first: what
    spills (the CKA items past the pinned pool, then compensation's matrices) would otherwise take RAM beside
    the pinned pool itself (half the free RAM) and the matrices kept in memory: at 16 blocks x 128 x 2048
    tokens, 4 removed, the run stores ~132 GiB in all (kept inputs 68, CKA items 30, compensation's matrices
    34 when the candidates share their runs), more than the 128 GiB host holds beside the process."""
    if tiny or shutil.disk_usage(scratch).free - checkpoint_left >= 24e9:
        return scratch / "offload"
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free >= 48e9:
        return Path(tempfile.mkdtemp(prefix="sglp-gpu70b-offload-", dir=shm))
    return scratch / "offload"


def device_name(device: str) -> str:
    import platform

    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores (torch {torch.__version__})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="toy shapes on the CPU (what the tests run)")
    ap.add_argument("--blocks", type=int, default=None, help="blocks in the checkpoint (default 16; tiny 4)")
    ap.add_argument("--scratch", default=None, help="folder for the checkpoint (default: a temp folder, removed)")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds for everything (default 480; tiny 55)")
    ap.add_argument("--windows", type=int, default=None, help="calibration windows (default 128; tiny 8)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per window (default 2048; tiny 64)")
    ap.add_argument("--offload-dir", default=None,
                    help="where spilled activations, CKA items and compensation matrices go (default: the "
                         "scratch folder when it keeps 24 GB free beside the checkpoint, else /dev/shm when it has "
                         "48 GB: at 128 x 2048 tokens the CKA items alone are ~32 GB)")
    ap.add_argument("--out", default=None, help="markdown report (default results/scale_gpu.md; tiny: none)")
    ap.add_argument("--json", default=None, help="also write every number as JSON here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        return child_main(json.loads(args.child))
    t_start = time.perf_counter()
    spec = dict(TINY if args.tiny else FULL)
    for key in ("blocks", "windows", "seq_len"):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    limit = args.time_limit if args.time_limit is not None else spec.pop("time_limit")
    spec.pop("time_limit", None)
    spec["remove"] = max(1, spec["blocks"] // 4)
    if spec["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("gpu_70b.py: needs a CUDA GPU (run with --tiny for the CPU version of the flow)", file=sys.stderr)
            return 2
    out = Path(args.out) if args.out else (None if args.tiny else HERE / "results" / "scale_gpu.md")
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="sglp-gpu70b-"))
    scratch.mkdir(parents=True, exist_ok=True)
    model_dir = scratch / f"{spec['shape']}-{spec['blocks']}"
    need = checkpoint_bytes(spec["shape"], spec["blocks"])
    if not (model_dir / "config.json").exists() and shutil.disk_usage(scratch).free < 1.05 * need:
        print(f"gpu_70b.py: {scratch} has {shutil.disk_usage(scratch).free / 1e9:.1f} GB free, the checkpoint needs "
              f"{need / 1e9:.1f} GB; pass --scratch on a bigger disk or fewer --blocks", file=sys.stderr)
        return 2
    written = (model_dir / "config.json").exists()
    offload = args.offload_dir or default_offload_dir(scratch, args.tiny, 0 if written else need)
    try:
        t0 = time.perf_counter()
        if not (model_dir / "config.json").exists():
            write_checkpoint(model_dir, blocks=spec["blocks"], shape=spec["shape"], seed=0, device=spec["device"],
                             log=lambda *a: print(*a, flush=True))
        checkpoint_s = time.perf_counter() - t0
        spec.update(model_dir=str(model_dir), offload_dir=str(offload))
        phases, status, log_tail = run_child(spec, limit - (time.perf_counter() - t_start) - 5.0)
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
        if args.offload_dir is None:
            shutil.rmtree(offload, ignore_errors=True)
    derived = derive(spec, phases, checkpoint_s)
    derived.update(status=status, device=device_name(spec["device"]), total_s=time.perf_counter() - t_start,
                   log_tail=log_tail)
    text = "\n".join(report_lines(derived, derived["device"], status)) + "\n"
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(derived, indent=1, default=str))
    return 0 if status == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
