"""Data-parallel calibration and search (sglp_fast/distributed.py) on CPU with gloo: 1 vs 2 vs 3 processes.

Each process is a fresh interpreter (subprocess, one thread, MASTER_ADDR=127.0.0.1 and a free port) running
the API (or the CLI as torchrun would start it) on a tiny random Llama with 7 calibration windows, so that 2
ranks split them 4/3 and 3 ranks 3/2/2 (the 4 check windows of the verified search live on one rank or on
two). Tolerances: the sums are the same numbers added in another order, so CKA agrees to 1e-6 (float64 sums),
compensation maps to 1e-5 and GradNorm to 1e-5 relative (float32 gradients all-reduced); the search without
compensation sees bit-identical per-window check losses (gathered in the window order): its record is equal.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from sglp_fast import distributed
from pipeline_models import save_tiny

slow = pytest.mark.slow  # the process-spawning tests: ~70 s together on 2 shared cores
TIMEOUT_S = 60  # the process group's timeout in the workers; a failure must end the run well before

WORKER = textwrap.dedent('''
    import datetime, json, os, sys
    import torch
    import torch.distributed as td
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world > 1:
        td.init_process_group("gloo", timeout=datetime.timedelta(seconds=float(os.environ["TEST_TIMEOUT"])))
    import sglp_fast
    from sglp_fast import api, distributed
    model_dir, out = sys.argv[1], sys.argv[2]
    if os.environ.get("TEST_FAIL_RANK") == str(rank):  # the test injects a failure here, not the library
        plain = api._CKAObserver.observe
        def observe(self, layer, *args):
            if layer == 2:
                raise RuntimeError(f"injected failure at block 2")
            return plain(self, layer, *args)
        api._CKAObserver.observe = observe
    kw = dict(calib="builtin", calib_seqs=7, seq_len=16, seed=0, progress=False)
    try:
        a = sglp_fast.analyze(model_dir, remove=2, scorer="verified", gradients=True, compensate=True, **kw)
        maps = a.verifier.transforms([2, 3], policy="fixed")
        gradnorm_plan = a.plan_for(remove=2, scorer="gradnorm").removed
        a.close()
        b = sglp_fast.analyze(model_dir, remove=2, compensate=False, greedy=True, **kw)
        b.close()
        res = sglp_fast.prune(model_dir, remove=2, output=os.path.join(out, "model"), **kw)
        record = {"cka": a.cka.tolist(), "gradnorm": list(a.scores["gradnorm"]), "loss": a.calib_result.loss,
                  "tokens": a.calib_result.tokens, "block_influence": list(a.scores["block_influence"]),
                  "removed": a.plan.removed, "selection": a.plan.extra.get("selection"),
                  "maps": {str(k): v.tolist() for k, v in maps.items()}, "gradnorm_plan": gradnorm_plan,
                  "plain_removed": b.plan.removed, "plain_selection": b.plan.extra.get("selection"),
                  "pruned_removed": res.plan.removed, "output": res.output_dir,
                  "comm_bytes": dict(distributed.comm_bytes)}
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(record, f)
    except Exception as err:
        print(f"worker rank {rank}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        if world > 1 and td.is_initialized():
            td.destroy_process_group()
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world: int, port: int, **extra: str) -> dict[str, str]:
    env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
           "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TEST_TIMEOUT": str(TIMEOUT_S),
           "SGLP_DIST_TIMEOUT": str(TIMEOUT_S), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("SGLP_TEST_FAIL_RANK", None)
    env.update(extra)
    return env


def _launch(argv_of_rank, world: int, cwd: Path, wall_limit: float = 150, **extra: str):
    """Start ``world`` processes like torchrun would; (return codes, stdouts, stderrs, seconds)."""
    port = _free_port()
    t0 = time.perf_counter()
    procs = [subprocess.Popen(argv_of_rank(r), cwd=cwd, env=_env(r, world, port, **extra),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    outs = []
    try:
        for p in procs:
            left = max(1.0, wall_limit - (time.perf_counter() - t0))
            outs.append(p.communicate(timeout=left))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in procs], [o for o, _ in outs], [e for _, e in outs], time.perf_counter() - t0


def _run_workers(tmp: Path, model_dir: Path, world: int, **extra: str):
    out = tmp / f"world{world}{'-fail' if extra else ''}"
    out.mkdir()
    script = tmp / "worker.py"
    script.write_text(WORKER)
    codes, stdouts, stderrs, secs = _launch(lambda r: [sys.executable, str(script), str(model_dir), str(out)],
                                            world, tmp, **extra)
    return out, codes, stderrs, secs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    model_dir = save_tiny(tmp / "tiny-llama", "llama", layers=6)
    results = {}
    for world in (1, 2, 3):
        out, codes, stderrs, _ = _run_workers(tmp, model_dir, world)
        assert codes == [0] * world, f"world {world}: exit codes {codes}\n" + "\n".join(stderrs)
        results[world] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    return tmp, model_dir, results


# ----------------------------------------------------------------------------------- helpers, no group
def test_split_is_contiguous_in_order_and_even_within_one():
    for n in (1, 7, 16, 17):
        for world in range(1, min(n, 5) + 1):
            ranges = [distributed.split_range(n, world, r) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [e - s for s, e in ranges]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert [distributed.split_range(7, 3, r) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]


def test_without_a_group_every_helper_is_the_identity():
    x = np.arange(6.0).reshape(2, 3)
    assert distributed.all_reduce_sum(x) is x and distributed.gather_rows(x, axis=1) is x
    assert distributed.all_reduce_sum(3) == 3 and distributed.window_range(5) == (0, 5)
    assert distributed.gather_lists([1.0, 2.0]) == [1.0, 2.0]
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    distributed.check_failures()  # no-op


# ----------------------------------------------------------------------------------- 1 vs 2 vs 3 ranks
@slow
@pytest.mark.parametrize("world", [2, 3])
def test_same_plan_cka_maps_and_scores_as_one_process(runs, world):
    _, _, results = runs
    ref = results[1][0]
    worst = {key: max(float(np.max(np.abs(np.asarray(g[key]) - np.asarray(ref[key])))) for g in results[world])
             for key in ("cka", "gradnorm", "loss")}
    worst["maps"] = max(float(np.max(np.abs(np.asarray(g["maps"]["1"]) - np.asarray(ref["maps"]["1"]))))
                        for g in results[world])
    print(f"world {world}: largest differences to one process: {worst}")  # shown with -s
    for rank, got in enumerate(results[world]):  # every rank holds the same (global) result
        assert got["removed"] == ref["removed"] and got["pruned_removed"] == ref["pruned_removed"]
        assert got["tokens"] == ref["tokens"]
        assert abs(got["loss"] - ref["loss"]) <= 1e-9 * abs(ref["loss"])
        np.testing.assert_allclose(got["cka"], ref["cka"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(got["block_influence"], ref["block_influence"], rtol=1e-9)
        assert sorted(got["maps"]) == sorted(ref["maps"]) == ["1"]
        for k in ref["maps"]:
            np.testing.assert_allclose(got["maps"][k], ref["maps"][k], rtol=0, atol=1e-5)
        # GradNorm: float32 block gradients summed over ranks before the norms
        np.testing.assert_allclose(got["gradnorm"], ref["gradnorm"], rtol=1e-5)
        assert got["gradnorm_plan"] == ref["gradnorm_plan"]
        # the search without compensation: bit-identical check losses, gathered in the global window order
        assert got["plain_removed"] == ref["plain_removed"]
        assert got["plain_selection"] == ref["plain_selection"]
        sel, ref_sel = got["selection"], ref["selection"]
        assert (sel["picked"], sel["compensated"], sel["verify_windows"], sel["self_fit_windows"]) == \
            (ref_sel["picked"], ref_sel["compensated"], ref_sel["verify_windows"], 16)  # each rank samples its share
        assert sel["block_forwards"] == ref_sel["block_forwards"]  # the work of every rank together
        assert (got["output"] is not None) == (rank == 0)  # rank 0 alone writes the model


@slow
@pytest.mark.parametrize("world", [2, 3])
def test_saved_weights_match_the_one_process_run(runs, world):
    tmp, _, _ = runs
    ref_dir, got_dir = tmp / "world1" / "model", tmp / f"world{world}" / "model"
    files = sorted(p.name for p in ref_dir.glob("*.safetensors"))
    assert files and files == sorted(p.name for p in got_dir.glob("*.safetensors"))
    for name in files:
        with safe_open(ref_dir / name, "pt") as a, safe_open(got_dir / name, "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys())
            for key in a.keys():
                assert a.get_slice(key).get_shape() == b.get_slice(key).get_shape(), key
                np.testing.assert_allclose(b.get_tensor(key).numpy(), a.get_tensor(key).numpy(), atol=1e-5)


@slow
def test_communication_is_counted(runs):
    _, _, results = runs
    counted = results[2][0]["comm_bytes"]
    L = 6
    assert counted["cka"] == 3 * (L * L + 2) * 8  # three analyses (analyze, analyze, prune)
    assert counted["gradients"] > 0 and counted["compensation"] > 0 and counted["last_token"] > 0
    assert results[1][0]["comm_bytes"] == {}


# ----------------------------------------------------------------------------------- failures
@slow
def test_a_failing_rank_fails_every_rank_naming_it(runs):
    tmp, model_dir, _ = runs
    out, codes, stderrs, secs = _run_workers(tmp, model_dir, 3, TEST_FAIL_RANK="1")
    assert all(c != 0 for c in codes), (codes, stderrs)
    assert secs < TIMEOUT_S, f"the failure took {secs:.0f} s: the ranks waited for the timeout"
    assert "RuntimeError: injected failure at block 2" in stderrs[1]
    for r in (0, 2):
        assert "rank 1 of 3 failed: RuntimeError: injected failure at block 2" in stderrs[r], stderrs[r]
    assert not list(out.glob("rank*.json"))


# ----------------------------------------------------------------------------------- the CLI under torchrun
@slow
def test_cli_two_ranks_like_torchrun(runs):
    tmp, model_dir, results = runs
    out = tmp / "cli-out"
    argv = [sys.executable, "-m", "sglp_fast", "prune", str(model_dir), "--calib-seqs", "7",
            "--seq-len", "16", "--remove", "2", "--output", str(out), "--no-eval"]
    codes, stdouts, stderrs, _ = _launch(lambda r: argv, 2, tmp)
    assert codes == [0, 0], stderrs
    assert stdouts[1] == "" and stderrs[1] == ""  # ranks > 0 print nothing but errors
    assert "saved:" in stdouts[0]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["removed"] == results[1][0]["pruned_removed"]
