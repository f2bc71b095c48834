"""The CLI hands results to other tools: GGUF out, mergekit / llama.cpp exports, lm-evaluation-harness."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

import sglp_fast
from pipeline_models import save_tiny
from sglp_fast.plan import build_plan
from test_lm_eval import DOCS, TASK

FAST = ["--calib-seqs", "6", "--seq-len", "16", "--verify-windows", "2", "--no-eval", "-q"]


def sglp(*argv, prelude: str = ""):
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    code = f"{prelude}\nimport sys\nfrom sglp_fast.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    root = tmp_path_factory.mktemp("eco")
    model = save_tiny(root / "tiny", "llama", layers=6)
    plain = sglp("prune", model, "--remove", 2, *FAST, "--no-compensate", "-o", root / "plain")
    assert plain.returncode == 0, plain.stderr
    # a compensated plan of the same model (the search may prefer a plain one on a tiny model: build it)
    with sglp_fast.analyze(str(model), "builtin", calib_seqs=6, seq_len=16, verify_windows=2) as an:
        removed = [2, 3]
        plan = build_plan(model_info=an.model_info, calibration=an.calibration_info, cka=an.cka,
                          segments=an.plan.segments, k=an.plan.k, k_rule=an.plan.k_rule, scorer="verified",
                          scores=an.scores, remove=2, selection={"removed": removed, "method": "verified"},
                          transforms=an.verifier.transforms(removed, policy="fixed"), compensation={"alpha": 1.0},
                          allow_empty_segments=True)
    (root / "comp").mkdir()
    plan.save(root / "comp" / "plan.json")
    return model, root / "plain" / "plan.json", root / "comp" / "plan.json"


def test_export_mergekit_and_llama_cpp(plans, tmp_path):
    model, plain, comp = plans
    removed = json.loads(plain.read_text())["removed"]
    kept = [i for i in range(6) if i not in removed]
    out = sglp("export", "mergekit", plain, "--model", "org/tiny")
    assert out.returncode == 0, out.stderr
    doc = yaml.safe_load(out.stdout)
    covered = [i for s in doc["slices"] for a, b in [s["sources"][0]["layer_range"]] for i in range(a, b)]
    assert covered == kept and doc["merge_method"] == "passthrough"
    assert all(s["sources"][0]["model"] == "org/tiny" for s in doc["slices"])
    f = tmp_path / "merge.yml"
    assert sglp("export", "mergekit", plain, "-o", f).returncode == 0 and yaml.safe_load(f.read_text())["slices"]
    cmd = sglp("export", "llama-cpp", plain, "--gguf-in", "in.gguf", "--gguf-out", "out.gguf")
    assert cmd.returncode == 0
    assert cmd.stdout.split() == ["llama-quantize", "--prune-layers", ",".join(map(str, removed)), "in.gguf",
                                  "out.gguf", "COPY"]
    for target, extra in (("mergekit", []), ("llama-cpp", ["--gguf-in", "a.gguf", "--gguf-out", "b.gguf"])):
        refused = sglp("export", target, comp, *extra)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert "compensat" in refused.stderr and "sglp apply" in refused.stderr  # says what to use instead


def test_eval_runs_lm_eval_tasks_offline(plans, tmp_path):
    model = plans[0]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "sglp_tiny_mc.yaml").write_text(TASK.format(data=json.dumps(str(data))), encoding="utf-8")
    run = sglp("eval", model, "--tasks", "sglp_tiny_mc", "--include-path", tasks, "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)["result"]
    acc = result["results"]["sglp_tiny_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0 and result["tasks"] == ["sglp_tiny_mc"]
    missing = sglp("eval", model, "--tasks", "arc_easy", prelude="import sys; sys.modules['lm_eval'] = None")
    assert missing.returncode == 2 and "sglp-fast[eval]" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.slow
def test_prune_to_gguf_keeps_the_quantization_and_the_perplexity(tmp_path):
    """The default SmolLM2 GGUF in, a pruned GGUF out: kept tensors stay Q4_1, it loads in transformers, and its
    perplexity equals the in-memory pruned model's (compensated tensors in F16, the exact fold rounded)."""
    out = tmp_path / "g"
    run = sglp("prune", "--remove", 3, "--calib-seqs", 6, "--seq-len", 64, "--verify-windows", 2, "--eval-seqs", 2,
               "-q", "--format", "gguf", "-o", out, "--json")
    assert run.returncode == 0, run.stderr
    res = json.loads(run.stdout)["result"]
    info = res["gguf"]
    assert (out / "model.gguf").is_file() and (out / "plan.json").is_file()
    assert info["output_bytes"] < info["source_bytes"] and info["tensor_types"].get("Q4_1", 0) > 100
    assert set(info["compensated"].values()) <= {"F16"}
    again = sglp("eval", out / "model.gguf", "--eval-seqs", 2, "--seq-len", 64, "-q", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["result"]["perplexity"] == pytest.approx(res["perplexity_after"], rel=2e-3)
