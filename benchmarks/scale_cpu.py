"""70B-shaped checkpoints on this CPU: `sglp prune --lazy --remove 1` with 4 and with 8 blocks (one command).

    .venv/bin/python benchmarks/scale_cpu.py [--scratch DIR] [--blocks 4 8] [--keep]    (~40 GB of disk)

Variants per checkpoint: `--no-compensate` (the layer-by-layer engine alone) and the default (the verified
search with compensation, whose d x d float64 statistics and maps are 512 MiB each at hidden 8192) under
`--max-memory` at the least the run needs (the figure its refusal of a 1 GiB budget names) with
`--offload-dir`: the matrices past the room the budget leaves them go to disk. `--variants` picks them
(`default` alone: no budget).

Writes each checkpoint with benchmarks/make_synthetic.py (random bf16, Llama-3-70B shapes), runs the CLI in a
child process (small calibration: 2 windows x 64 tokens, 2 x 64 tokens of perplexity), samples the child's
resident memory every 50 ms (peak RSS, /proc), and writes benchmarks/results/scale_cpu.md: peak RSS against
2 blocks + embedding/head + activations + 1 GiB, wall time per stage and per block, bytes read from disk per
stage against the checkpoint's size.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_synthetic import config_for, tensor_specs, write_checkpoint  # noqa: E402
from sglp_fast.sizes import size_from_text  # noqa: E402

GiB = 2**30


def _rss(pid: int) -> dict[str, int]:
    """Resident memory: VmRSS, and its anonymous part (RssAnon: what the run allocated; the rest, RssFile, is
    page cache of the mmapped safetensors shards, which the kernel can drop under pressure)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key = line.split(":", 1)[0]
                if key in ("VmRSS", "RssAnon"):
                    out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


VARIANTS = {"default": [], "no-compensate": ["--no-compensate"], "default, budget": ["--max-memory", "least"]}
BASE = ["--lazy", "--remove", "1", "--calib-seqs", "2", "--seq-len", "64", "--eval-seqs", "2", "--verify-windows",
        "1", "--dtype", "bfloat16"]


def least_budget(model: Path, offload: Path) -> str:
    """The least the run needs, from the refusal of a budget below it (the error names the figure)."""
    cmd = [sys.executable, "-m", "sglp_fast.cli", "prune", str(model), *BASE, "--max-memory", "1GiB",
           "--offload-dir", str(offload), "-o", str(offload / "never"), "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    m = re.search(r"at least ([0-9.]+ [KMGT]?i?B)", proc.stderr)
    if proc.returncode == 0 or not m:
        raise SystemExit(f"expected a refusal naming the least budget, got ({proc.returncode}):\n{proc.stderr}")
    return m.group(1).replace(" ", "")


def run_one(model: Path, out: Path, variant: str, offload: Path) -> dict:
    extra = list(VARIANTS[variant])
    if "least" in extra:
        extra[extra.index("least")] = least_budget(model, offload)
        extra += ["--offload-dir", str(offload)]
    cmd = [sys.executable, "-m", "sglp_fast.cli", "prune", str(model), *BASE, *extra, "-o", str(out),
           "--json"]  # not -q: stderr has the memory plan's predicted peak
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"VmRSS": 0, "RssAnon": 0}

    def sample():
        while proc.poll() is None:
            for key, value in _rss(proc.pid).items():
                peak[key] = max(peak[key], value)
            time.sleep(0.05)
    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    stdout, stderr = proc.communicate()
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"sglp prune failed ({proc.returncode}):\n{stderr}")
    result = json.loads(stdout)["result"]
    result["peak_rss"], result["peak_anon"] = peak["VmRSS"], peak["RssAnon"]
    result["budget"] = extra[extra.index("--max-memory") + 1] if "--max-memory" in extra else None
    selection = json.loads((out / "plan.json").read_text()).get("selection", {})
    result["matrices"] = selection.get("matrices")  # the search's d x d matrices: exact peaks in memory, on disk
    result["removed_blocks"] = json.loads((out / "plan.json").read_text()).get("removed")
    m = re.search(r"predicted peak: ([0-9.]+ [KMGT]?i?B)", stderr)
    result["predicted_peak"] = size_from_text(m.group(1)) if m else None
    result["command_s"] = time.perf_counter() - t0
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scratch", default=None, help="folder for the checkpoints (default: a temp folder)")
    ap.add_argument("--blocks", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["no-compensate", "default, budget"])
    args = ap.parse_args()
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="sglp-scale-"))
    rows = []
    try:
        for n in args.blocks:
            model = scratch / f"llama70b-shaped-{n}"
            if not (model / "config.json").exists():
                info = write_checkpoint(model, blocks=n, shape="70b", seed=0, log=lambda *a: print(*a, flush=True))
                print(f"wrote {n} blocks: {info['bytes'] / 1e9:.1f} GB in {info['seconds']:.0f} s", flush=True)
            for variant in args.variants:
                res = run_one(model, scratch / f"out-{n}", variant, scratch / "offload")
                shutil.rmtree(scratch / f"out-{n}", ignore_errors=True)
                res["blocks"], res["variant"] = n, variant
                rows.append(res)
                print(json.dumps({k: res[k] for k in ("variant", "blocks", "peak_rss", "peak_anon", "predicted_peak",
                                                      "budget", "matrices", "removed_blocks", "command_s",
                                                      "bytes_read")}), flush=True)
    finally:
        if not args.keep and args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    write_report(rows)
    return 0


def write_report(rows: list[dict]) -> None:
    cfg = config_for("70b", 1)
    sizes = {n: __import__("math").prod(s) * 2 for n, s, _ in tensor_specs(cfg)}
    block = sum(v for k, v in sizes.items() if ".layers.0." in k)
    other = sum(v for k, v in sizes.items() if ".layers." not in k)
    acts = 2 * 64 * cfg.hidden_size * 4 * 8  # generous: a few fp32 activation slots of 2 x 64 tokens
    bound = 2 * block + other + acts + GiB  # two bf16 blocks, the bf16 embedding/head, activations, 1 GiB
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# 70B-shaped checkpoints on the CPU (`benchmarks/scale_cpu.py`, {now}, {os.cpu_count()} cores)", "",
             "`sglp prune MODEL --lazy --remove 1 --calib-seqs 2 --seq-len 64 --eval-seqs 2 --verify-windows 1 "
             "--dtype bfloat16 [--no-compensate | --max-memory LEAST --offload-dir DIR]` on Llama-3-70B-shaped "
             "checkpoints of random bf16 weights (`benchmarks/make_synthetic.py`: one block 1.71 GB, embedding + "
             "head 4.2 GB on disk). LEAST: the least the run needs, as the refusal of a 1 GiB budget names it "
             "(compensation's d x d matrices spill to DIR past the room the budget leaves them; its solve's "
             "temporaries, 5 x 512 MiB, cannot).", "",
             "Peak RSS is VmRSS, sampled every 50 ms; of it, RssAnon is what the run allocated (the rest is page "
             "cache of the mmapped shards and of the spilled matrices, which the kernel drops under memory "
             "pressure).", "",
             "| variant | blocks | checkpoint | peak RSS | of it anonymous | memory plan's predicted peak | "
             "--max-memory | bound (2 blocks + embedding/head + activations + 1 GiB) | search's d x d matrices: "
             "peak in memory / on disk | removed | wall | per block (calibrate) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        t = r["timings"]
        predicted = "-" if r.get("predicted_peak") is None else (
            f"{r['predicted_peak'] / GiB:.2f} GiB ({100 * (r['predicted_peak'] / r['peak_anon'] - 1):+.0f}% of the "
            "anonymous peak)")
        mat = r.get("matrices")
        mat = "-" if not mat else (f"{mat['peak_in_memory_bytes'] / GiB:.2f} / "
                                   f"{mat['peak_on_disk_bytes'] / GiB:.2f} GiB")
        lines.append(f"| {r['variant']} | {r['blocks']} | {r['checkpoint_bytes'] / 1e9:.1f} GB | "
                     f"{r['peak_rss'] / GiB:.2f} GiB | {r['peak_anon'] / GiB:.2f} GiB | "
                     f"{predicted} | {r.get('budget') or '-'} | {bound / GiB:.2f} GiB | {mat} | "
                     f"{r.get('removed_blocks')} | {r['command_s']:.0f} s | "
                     f"{t['calibrate_s'] / r['blocks']:.1f} s |")
    for r in rows:
        if r.get("budget"):
            within = r["peak_anon"] <= size_from_text(r["budget"])
            lines += ["", f"{r['variant']}, {r['blocks']} blocks: anonymous peak {r['peak_anon'] / GiB:.2f} GiB "
                          f"{'within' if within else 'OVER'} --max-memory {r['budget']}."]
    for variant in VARIANTS:
        mine = [r for r in rows if r["variant"] == variant]
        if len(mine) >= 2:
            a, b = mine[0], mine[-1]
            lines += ["", f"{variant}: peak RSS from {a['blocks']} to {b['blocks']} blocks "
                          f"{100 * (b['peak_rss'] / a['peak_rss'] - 1):+.1f}% (anonymous "
                          f"{100 * (b['peak_anon'] / a['peak_anon'] - 1):+.1f}%; goal <= +10%); at {b['blocks']} "
                          f"blocks the RSS is {'below' if b['peak_rss'] <= bound else 'above'} the bound, the "
                          f"anonymous part {'below' if b['peak_anon'] <= bound else 'above'} it."]
    lines += ["", "Seconds per stage and bytes read from disk per stage:", "",
              "| variant | blocks | load | calibrate | plan (search + fit) | eval (before + after) | save | "
              "read total / checkpoint |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        t, br = r["timings"], r["bytes_read"]
        total = sum(br.values())
        cell = lambda k, s: f"{t.get(s, 0):.0f} s, {br.get(k, 0) / 1e9:.1f} GB"  # noqa: E731
        lines.append(f"| {r['variant']} | {r['blocks']} | {cell('load', 'load_s')} | "
                     f"{cell('calibrate', 'calibrate_s')} | "
                     f"{cell('plan', 'plan_s')} | {br.get('eval', 0) / 1e9:.1f} GB | {br.get('save', 0) / 1e9:.1f} GB | "
                     f"{total / r['checkpoint_bytes']:.2f}x (calibrate + plan + save: "
                     f"{(br['calibrate'] + br['plan'] + br['save']) / r['checkpoint_bytes']:.2f}x) |")
    (HERE / "results" / "scale_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
