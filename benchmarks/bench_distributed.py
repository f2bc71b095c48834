"""Data-parallel `sglp prune`: communicated bytes (formula and counted) and wall time of 1 vs N processes.

    .venv/bin/python benchmarks/bench_distributed.py            # SmolLM2 (default model), 16 x 256 tokens
    .venv/bin/python benchmarks/bench_distributed.py --formulas-only

Each process gets one thread (OMP_NUM_THREADS=1, torch.set_num_threads(1)); the N processes are started the
way torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, a free MASTER_PORT) and run the
CLI's `main` (gloo on CPU). Each rank dumps `sglp_fast.distributed.comm_bytes` (the payload bytes it handed to
collectives, per tag) and the analysis timings; results go to a JSON file and are printed as markdown.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RANK_MAIN = r"""
import json, os, sys, time
import torch
torch.set_num_threads(1)
from sglp_fast import api, cli, distributed
seen = {}
plain = api.analyze
def analyze(*a, **k):
    out = plain(*a, **k)
    seen.update(out.timings)
    return out
api.analyze = analyze
t0 = time.perf_counter()
code = cli.main(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump({"code": code, "wall_s": time.perf_counter() - t0, "comm_bytes": dict(distributed.comm_bytes),
               "timings": seen}, f)
sys.exit(code)
"""


def llama_block_params(d: int, d_kv: int, d_ff: int) -> int:
    """q, o: d x d; k, v: d x d_kv; gate, up, down: d x d_ff; two RMSNorm weights."""
    return 2 * d * d + 2 * d * d_kv + 3 * d * d_ff + 2 * d


def formulas(L: int, d: int, n: int, world: int, block_params: int, maps: int) -> dict[str, float]:
    """Payload bytes per rank (what `comm_bytes` counts) for one `sglp prune` run.

    all-reduce payload = the buffer (a ring all-reduce moves ~2(W-1)/W of it in and out of each rank);
    all-gather payload = the gathered output (W x the largest rank's share, padded).
    """
    share = -(-n // world)  # the largest rank's windows
    return {
        "calibration sums (counts 2, block influence + relative update 2L, loss 1)": 8 * (2 + 2 * L + 1),
        "CKA HSIC sums (L^2 + 2)": 8 * (L * L + 2),
        "last-token states ((L+1) x n x d, all-gather)": 8 * (L + 1) * d * share * world,
        "compensation per fitted map (X^T X and X^T Y, 2 d^2)": 16 * d * d,
        f"compensation, {maps} maps": 16 * d * d * maps,
        "GradNorm per block (fp32 gradient of the block)": 4 * block_params,
        "GradNorm per run (L blocks; gradient scorers only)": 4 * block_params * L,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, argv: list[str], out: Path) -> dict:
    port = _free_port()
    procs = []
    t0 = time.perf_counter()
    for r in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        if world > 1:
            env.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        result = str(out / f"w{world}-r{r}.json")
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_MAIN, result, *argv],
                                      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    logs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - t0
    if any(p.returncode for p in procs):
        raise SystemExit(f"world {world} failed:\n" + "\n".join(logs))
    ranks = [json.loads((out / f"w{world}-r{r}.json").read_text()) for r in range(world)]
    return {"world": world, "wall_s": wall, "ranks": ranks, "stdout_rank0": logs[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--calib-seqs", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--json-out", default=str(ROOT / "benchmarks" / "results" / "distributed.json"))
    ap.add_argument("--formulas-only", action="store_true")
    args = ap.parse_args()
    smol = llama_block_params(576, 192, 1536)
    big = llama_block_params(8192, 1024, 28672)
    print(f"block parameters: SmolLM2-135M {smol:,}; 70B shape (d 8192, kv 1024, ffn 28672) {big:,}")
    for name, L, d, p in (("SmolLM2 (L=30, d=576)", 30, 576, smol), ("70B (L=80, d=8192)", 80, 8192, big)):
        print(f"\n{name}, n={args.calib_seqs} windows, {args.world} ranks:")
        for what, b in formulas(L, d, args.calib_seqs, args.world, p, 1).items():
            print(f"  {what}: {b:,.0f} B ({b / 2**20:,.2f} MiB)")
    if args.formulas_only:
        return
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for world in (1, args.world):
            out = Path(tmp) / f"out{world}"
            out.mkdir()
            argv = ["prune", "--calib-seqs", str(args.calib_seqs), "--seq-len", str(args.seq_len), "--ratio",
                    str(args.ratio), "--output", str(out / "model"), "--overwrite"]
            results.append(run(world, argv, out))
            print(f"\nworld {world}: {results[-1]['wall_s']:.1f} s\n{results[-1]['stdout_rank0']}")
    Path(args.json_out).write_text(json.dumps(results, indent=1))
    one, many = results
    print(f"wall time 1 process {one['wall_s']:.1f} s, {args.world} processes {many['wall_s']:.1f} s: "
          f"ratio {one['wall_s'] / many['wall_s']:.2f}x")
    for r, rank in enumerate(many["ranks"]):
        total = sum(rank["comm_bytes"].values())
        print(f"rank {r}: {total:,} B counted: {rank['comm_bytes']}; timings {rank['timings']}")


if __name__ == "__main__":
    main()
