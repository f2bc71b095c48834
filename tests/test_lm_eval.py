"""lm-evaluation-harness through its Python API, offline: a task of our own over a JSON file, on a tiny Llama."""
from __future__ import annotations

import json
import math
import sys

import pytest

from pipeline_models import save_tiny, single_thread
from sglp_fast.lm_eval import EXTRA_HINT, run_lm_eval

DOCS = [
    {"question": "The sky on a clear day is", "choices": [" blue", " green", " loud"], "answer": 0},
    {"question": "Two plus two equals", "choices": [" three", " four"], "answer": 1},
    {"question": "Water freezes when it is", "choices": [" cold", " hot", " sung", " late"], "answer": 0},
    {"question": "A cat says", "choices": [" moo", " meow"], "answer": 1},
    {"question": "Fire is", "choices": [" hot", " wet"], "answer": 0},
]

TASK = """task: sglp_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture
def tiny_task(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "sglp_tiny_mc.yaml").write_text(TASK.format(data=json.dumps(str(data))), encoding="utf-8")
    return tasks


def test_missing_extra_names_it(tmp_path, monkeypatch):
    model = save_tiny(tmp_path / "model", layers=2)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` does when it is not installed
    with pytest.raises(ImportError, match=r"pip install 'sglp-fast\[eval\]'"):
        run_lm_eval(model, ["arc_easy"])
    assert "sglp-fast[eval]" in EXTRA_HINT


def test_arguments_are_checked_before_anything_runs(tmp_path):
    model = save_tiny(tmp_path / "model", layers=2)
    with pytest.raises(ValueError, match="tasks: expected a non-empty list"):
        run_lm_eval(model, "arc_easy")
    with pytest.raises(ValueError, match="limit: expected"):
        run_lm_eval(model, ["arc_easy"], limit=0)
    with pytest.raises(ValueError, match="batch_size: expected"):
        run_lm_eval(model, ["arc_easy"], batch_size=0)
    with pytest.raises(ValueError, match="include_path: .* does not exist"):
        run_lm_eval(model, ["arc_easy"], include_path=tmp_path / "nope")
    with pytest.raises(ValueError, match="model_dir: .* has no config.json"):
        run_lm_eval(tmp_path, ["arc_easy"])
    (model / "tokenizer.json").unlink()
    (model / "tokenizer_config.json").unlink()
    with pytest.raises(ValueError, match="has no tokenizer files"):
        run_lm_eval(model, ["arc_easy"])


def _reference_acc(model_dir) -> float:
    """The task's accuracy computed here in float64: a choice's score is the sum of its tokens' log-probs after
    the question (lm-eval's loglikelihood: the continuation's tokens are those the question's encoding lacks)."""
    import torch
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(model_dir)
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    hits = 0
    for doc in DOCS:
        ctx = tok(doc["question"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in doc["choices"]:
            whole = tok(doc["question"] + choice, add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx):]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0], dim=-1)
            scores.append(sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
        hits += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    return hits / len(DOCS)


def test_local_multiple_choice_task_on_a_tiny_llama(tmp_path, tiny_task, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (the optional extra "
                        "sglp-fast[eval])")
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    model = save_tiny(tmp_path / "model", layers=2)
    with single_thread():
        out = run_lm_eval(model, ["sglp_tiny_mc"], include_path=tiny_task, device="cpu", dtype="float32")
    acc = out["results"]["sglp_tiny_mc"]["acc,none"]
    assert isinstance(acc, float) and math.isfinite(acc) and 0.0 <= acc <= 1.0
    assert acc == pytest.approx(_reference_acc(model), abs=1e-12)  # the harness scored what we score
    assert out["n-samples"]["sglp_tiny_mc"]["effective"] == len(DOCS)
    json.dumps(out)  # JSON-ready, as the CLI prints it
    with pytest.raises(ValueError, match=r"\['no_such_task_xyz'\] are not lm-eval tasks"):
        run_lm_eval(model, ["no_such_task_xyz"], include_path=tiny_task)
