"""benchmarks/gpu_70b.py end to end at toy size on the CPU (--tiny): every reported number is computed from
the measurements, the FLOP count agrees with torch's own counter, and the time guard keeps what it has."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_70b  # noqa: E402
from make_synthetic import config_for  # noqa: E402


def _script(*argv, timeout=120):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_70b.py"), *map(str, argv)],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu70b")
    t0 = time.perf_counter()
    run = _script("--tiny", "--out", tmp / "r.md", "--json", tmp / "r.json", "--scratch", tmp / "s")
    wall = time.perf_counter() - t0
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-3000:]
    return json.loads((tmp / "r.json").read_text()), (tmp / "r.md").read_text(), wall


def test_tiny_run_completes_within_a_minute(tiny_run):
    d, text, wall = tiny_run
    assert d["status"] == "completed"
    assert d["total_s"] < 60  # checkpoint, child and report (the parent's own start-up aside)
    assert text.startswith("# tiny-shaped checkpoint") and "Device: CPU" in text and " UTC." in text


def test_reported_numbers_are_computed_from_the_measurements(tiny_run):
    d, text, _ = tiny_run
    spec, mm, blk, pipe = d["spec"], d["matmul"], d["block"], d["pipeline"]
    assert mm["flops_per_s"] == pytest.approx(2 * mm["n"] ** 3 / mm["seconds"], rel=1e-12)
    fw = gpu_70b.block_forward_flops(config_for("tiny", 1), spec["seq_len"])
    assert blk["flops_per_window"] == fw
    k = blk["windows_per_call"]
    assert 1 <= k <= spec["windows"]
    assert blk["mfu"] == pytest.approx(k * fw / blk["seconds_per_call"] / mm["flops_per_s"], rel=1e-12)
    assert blk["mfu_one_window"] == pytest.approx(fw / blk["seconds_one_window"] / mm["flops_per_s"], rel=1e-12)
    L, t, c = pipe["num_blocks"], pipe["timings"], pipe["calibration"]
    assert L == spec["blocks"] and len(pipe["removed"]) == spec["remove"] == spec["blocks"] // 4
    assert pipe["per_block"]["calibrate_forward_s"] == pytest.approx(c["forward_s"] / L)
    assert pipe["per_block"]["plan_s"] == pytest.approx(t["plan_s"] / L)
    assert pipe["plan_80_s"] == pytest.approx(sum(pipe["fixed"].values()) + 80 * sum(pipe["per_block"].values()))
    # the plan stage's split (the verifier's parts) is inside plan_s, not counted again among the other stages
    parts = {k: v for k, v in t.items() if k.startswith("plan_") and k.endswith("_s") and k != "plan_s"}
    assert set(parts) == {"plan_statistics_s", "plan_fit_only_s", "plan_solve_s", "plan_check_s"}, t
    assert min(parts.values()) >= 0 and sum(parts.values()) <= t["plan_s"], t
    assert parts["plan_check_s"] > 0 and parts["plan_statistics_s"] > 0 and parts["plan_solve_s"] > 0, t  # compensated
    assert pipe["fixed"]["other_s"] == pytest.approx(sum(v for k, v in t.items() if k.endswith("_s") and not
                                                         k.startswith("plan_") and k not in ("load_s", "calibrate_s")))
    assert f"check {parts['plan_check_s']:.1f} s" in text
    assert pipe["forward_mfu"] == pytest.approx(L * spec["windows"] * fw / c["forward_s"] / mm["flops_per_s"])
    assert pipe["peak"]["allocated"] > 0 and t["calibrate_bytes_read"] > 0
    slot = spec["windows"] * spec["seq_len"] * config_for("tiny", 1).hidden_size * 4  # float32 run
    assert pipe["kept_inputs_bytes"] == {"measured_blocks": (L + 1) * slot, "target_blocks": 81 * slot}
    # the report prints these very numbers
    assert f"**{gpu_70b._fmt_s(pipe['plan_80_s'])}**" in text
    assert f"{100 * blk['mfu']:.1f}%" in text and f"| {k} |" in text
    assert f"removed {pipe['removed']}" in text


def test_block_forward_flops_match_torch_flop_counter():
    import transformers as tf
    from torch.utils.flop_counter import FlopCounterMode

    from sglp_fast.models import get_adapter

    cfg = config_for("tiny", 1)
    cfg._attn_implementation = "eager"  # every product an explicit matmul the counter sees
    model = tf.LlamaForCausalLM(cfg).eval()
    adapter = get_adapter(model)
    seq = 24
    ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden, calls = adapter.capture_block_calls({"input_ids": ids})
        with FlopCounterMode(display=False) as counter:
            adapter.call_block(adapter.blocks[0], hidden, calls[0])
    assert counter.get_total_flops() == gpu_70b.block_forward_flops(cfg, seq, causal=False)
    full, causal = (gpu_70b.block_forward_flops(cfg, seq, causal=c) for c in (False, True))
    q = cfg.num_attention_heads * cfg.head_dim
    assert full - causal == 4 * q * (seq * seq - seq * (seq + 1) // 2)  # only the masked half differs


def test_the_time_guard_reports_what_it_has(tmp_path):
    run = _script("--tiny", "--time-limit", 1, "--out", tmp_path / "r.md", "--json", tmp_path / "r.json")
    assert run.returncode == 1
    d = json.loads((tmp_path / "r.json").read_text())
    assert d["status"].startswith("timed out in ")
    assert "Pipeline: not measured" in (tmp_path / "r.md").read_text()


def test_a_stopped_run_reports_the_last_log_lines():
    d = {"spec": {"shape": "tiny", "max_memory": None, "blocks": 4, "windows": 8, "seq_len": 64, "dtype": "float32",
                  "remove": 1, "offload_dir": "/x"}, "checkpoint_s": 1.0,
         "log_tail": ["12:00:01 sglp_fast.selection.verifier: compensation: 2 new run(s)"]}
    text = "\n".join(gpu_70b.report_lines(d, "CPU", "timed out in pipeline (time limit reached)"))
    assert "Pipeline: not measured" in text and "last lines" in text and d["log_tail"][0] in text
    assert "last lines" not in "\n".join(gpu_70b.report_lines({**d, "log_tail": []}, "CPU", "completed"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_full_run_needs_a_gpu():
    run = _script(timeout=60)
    assert run.returncode == 2 and "needs a CUDA GPU" in run.stderr and "--tiny" in run.stderr


def test_the_gpu_session_script_runs_the_flow_and_names_real_tests(tmp_path):
    """benchmarks/gpu_session.sh (the one device command): valid bash, every test it names exists, and with
    TINY=1 on the CPU (its tests step off: RUN_TESTS=0) it installs, runs gpu_70b.py and leaves the report
    and the logs in $OUT, at most 8 files (what the device tool brings back)."""
    import re

    script = ROOT / "benchmarks" / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    for path, name in re.findall(r"(tests/test_\w+\.py)(?:::(\w+))?", text):
        assert (ROOT / path).exists(), path
        if name:
            assert f"def {name}(" in (ROOT / path).read_text(), name
    out = tmp_path / "out"
    env = {**os.environ, "TINY": "1", "PYTHON": sys.executable, "OUT": str(out), "TOTAL": "110", "TESTS": "0", "RUN_TESTS": "0",
           "SCRATCH": str(tmp_path / "scratch"), "TRITON_INTERPRET": "1"}
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=200, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "gpu_70b.py exit 0" in done.stdout, done.stdout[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert {"scale_gpu.md", "scale_gpu.json", "gpu_70b.log", "install.log"} <= set(files) and len(files) <= 8, files
    assert json.loads((out / "scale_gpu.json").read_text())["status"] == "completed"
