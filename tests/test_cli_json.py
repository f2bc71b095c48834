"""`--json`: one parseable document on stdout per command (failures included); logs: no carriage returns in
a file, one progress line per 10%, `-q` silences them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_models import save_tiny

FAST = ["--calib-seqs", "6", "--seq-len", "16", "--verify-windows", "2"]
EVAL = ["--eval-seqs", "2"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("json") / "tiny", "llama", layers=4)


def sglp(*argv, cwd=None):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-m", "sglp_fast.cli", *map(str, argv)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def document(proc) -> dict:
    """stdout holds exactly one JSON document, nothing else."""
    doc = json.loads(proc.stdout)
    assert isinstance(doc, dict) and doc["schema"] == "sglp-cli/1"
    assert doc["exit_code"] == proc.returncode and doc["ok"] == (proc.returncode == 0)
    return doc


def test_prune_apply_eval_analyze_json(model_dir, tmp_path):
    out = tmp_path / "pruned"
    p = sglp("prune", model_dir, "--remove", 2, *FAST, *EVAL, "-o", out, "--json")
    doc = document(p)
    assert p.returncode == 0, p.stderr
    r = doc["result"]
    assert doc["command"] == "prune" and len(r["removed"]) == 2 and r["output"] == str(out)
    assert r["params_after"] < r["params_before"] and r["perplexity_after"] > 0
    assert json.loads((out / "plan.json").read_text())["removed"] == r["removed"]
    assert "saved:" in p.stderr  # the human-readable lines moved to stderr

    a = sglp("apply", out / "plan.json", model_dir, *EVAL, "--seq-len", 16, "-o", tmp_path / "again", "--json")
    assert a.returncode == 0, a.stderr
    ra = document(a)["result"]
    assert ra["removed"] == r["removed"] and ra["params_after"] == r["params_after"]
    assert ra["perplexity_after"] == pytest.approx(r["perplexity_after"], rel=1e-6)

    e = sglp("eval", out, *EVAL, "--seq-len", 16, "--json")
    assert e.returncode == 0, e.stderr
    re_ = document(e)["result"]
    assert re_["perplexity"] == pytest.approx(r["perplexity_after"], rel=1e-5) and re_["num_blocks"] == 2

    an = sglp("analyze", model_dir, *FAST, "--remove", 1, "--json")
    assert an.returncode == 0, an.stderr
    plan = document(an)["result"]
    assert len(plan["cka"]) == 4 and len(plan["removed"]) == 1 and plan["format"] == "sglp-plan"


def test_compare_and_bench_json(model_dir, tmp_path):
    c = sglp("compare", model_dir, *FAST, *EVAL, "--remove", 1, "--methods", "sglp-verified", "shortgpt", "--json")
    assert c.returncode == 0, c.stderr
    rows = document(c)["result"]["rows"]
    assert {row["method"] for row in rows} == {"sglp-verified", "shortgpt"}
    b = sglp("bench", model_dir, *FAST, "--json")
    assert b.returncode == 0, b.stderr
    assert document(b)["result"]["tokens_per_s"] > 0
    f = tmp_path / "bench.json"
    b2 = sglp("bench", model_dir, *FAST, "--json", f)  # with FILE: the result part, stdout stays human-readable
    assert b2.returncode == 0 and "calibration throughput" in b2.stdout
    assert json.loads(f.read_text())["tokens"] == document(b)["result"]["tokens"]


@pytest.mark.parametrize("argv, code, kind", [
    (["prune", "--ratio", "1.5", "-o", "x"], 2, "input"),
    (["prune", "--remove", "1", "-o", "x", "--calib", "/no/such/file"], 2, "input"),
    (["prune", "--remove", "1", "--bogus-flag", "-o", "x"], 2, "usage"),
    (["eval", "/no/such/model"], 2, "input"),
])
def test_failures_are_json_documents_too(tmp_path, argv, code, kind):
    p = sglp(*argv, "--json", cwd=tmp_path)
    assert p.returncode == code
    doc = document(p)
    assert doc["error"]["kind"] == kind and "error:" in doc["error"]["message"]
    assert "Traceback" not in p.stderr


def test_log_file_gets_lines_not_carriage_returns(model_dir, tmp_path):
    """`sglp prune ... > log 2>&1`: progress is one line per 10% of the blocks, no \\r bars."""
    log = tmp_path / "log"
    with open(log, "w") as fh:
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        rc = subprocess.run([sys.executable, "-m", "sglp_fast.cli", "prune", str(model_dir), "--remove", "1", *FAST,
                             *EVAL, "-o", str(tmp_path / "o")], stdout=fh, stderr=subprocess.STDOUT, env=env,
                            timeout=300).returncode
    text = log.read_text()
    assert rc == 0, text
    assert "\r" not in text
    assert "calibrating: 4/4 (100%)" in text and "memory plan" in text
    quiet = sglp("prune", model_dir, "--remove", 1, *FAST, *EVAL, "-o", tmp_path / "q", "-q")
    assert quiet.returncode == 0 and "calibrating" not in quiet.stderr and "memory plan" not in quiet.stderr
    assert "Loading weights" not in quiet.stderr and "\r" not in quiet.stderr
