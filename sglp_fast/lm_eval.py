"""Score a pruned model on lm-evaluation-harness tasks (EleutherAI's ``lm_eval``), through its Python API.

Why: perplexity (``evaluate.py``) says how much a pruned model drifted; the harness's zero-shot tasks say what
it still does, comparably with published numbers. The harness is an optional extra (it brings datasets,
pandas, scikit-learn...): ``pip install 'sglp-fast[eval]'``; without it the entry point says so.

Named after the tool it wraps; it only imports the real ``lm_eval`` absolutely (no clash inside the package).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXTRA_HINT = "pip install 'sglp-fast[eval]'"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _import_harness():
    """The ``lm_eval`` module, or an ImportError that names the extra to install."""
    try:
        import lm_eval  # noqa: PLC0415  (optional extra)
        from lm_eval.tasks import TaskManager  # noqa: PLC0415
    except ImportError as e:
        raise ImportError(f"run_lm_eval needs lm-evaluation-harness, which is not installed ({e}); install the "
                          f"optional extra: {EXTRA_HINT}") from e
    return lm_eval, TaskManager


def _model_args(model_dir: str | os.PathLike, dtype: str) -> dict[str, Any]:
    """lm-eval's ``hf`` model arguments (the device goes separately) for a model folder or a .gguf file."""
    path = Path(os.path.abspath(os.fspath(model_dir)))
    if path.is_file() and path.suffix == ".gguf":  # transformers dequantizes it; the tokenizer comes from it too
        return {"pretrained": str(path.parent), "gguf_file": path.name, "dtype": dtype}
    if not path.is_dir():
        raise ValueError(f"model_dir: expected a model folder (the output of `sglp prune`/`sglp apply`) or a .gguf "
                         f"file, got {str(path)!r}, which does not exist or is another kind of file")
    if not (path / "config.json").is_file():
        raise ValueError(f"model_dir: {str(path)!r} has no config.json; pass a Hugging Face model folder such as "
                         "the output of `sglp prune`")
    if not _has_tokenizer(path):
        raise ValueError(f"model_dir: {str(path)!r} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); the "
                         "harness needs one to score text: save the tokenizer next to the model")
    return {"pretrained": str(path), "dtype": dtype}


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_FILES)


def _check_args(tasks: Any, limit: Any, batch_size: Any, include_path: Any) -> list[str]:
    if isinstance(tasks, str) or not isinstance(tasks, Sequence) or not tasks \
            or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"tasks: expected a non-empty list of task names such as ['hellaswag', 'arc_easy'], got "
                         f"{tasks!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float))
                              or not (limit >= 1 if isinstance(limit, int) else 0 < limit < 1)):
        raise ValueError(f"limit: expected None, a positive int (examples per task) or a float in (0, 1) (a "
                         f"fraction), got {limit!r}")
    if batch_size != "auto" and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size: expected a positive int or 'auto', got {batch_size!r}")
    if include_path is not None and not Path(include_path).exists():
        raise ValueError(f"include_path: {str(include_path)!r} does not exist; pass the folder (or YAML file) of "
                         "your task definitions")
    return list(tasks)


def _jsonable(obj: Any) -> Any:
    """lm-eval's results hold numpy scalars and the odd object; keep what JSON can hold, strings for the rest."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def run_lm_eval(model_dir: str | os.PathLike, tasks: Sequence[str], *, include_path: str | os.PathLike | None = None,
                limit: int | float | None = None, batch_size: int | str = 1, device: str = "cpu",
                num_fewshot: int | None = None, dtype: str = "auto", seed: int = 0) -> dict[str, Any]:
    """Run lm-evaluation-harness ``tasks`` on the model in ``model_dir`` (HF folder or .gguf) with its ``hf`` model.

    ``include_path``: a folder of extra task YAMLs (your own tasks, offline data). ``limit``: examples per task
    (int) or a fraction (float). Returns ``{"results": {task: {metric: value}}, "versions", "n-samples",
    "higher_is_better", "config", "lm_eval_version"}`` (JSON-ready; the per-example samples are not kept).
    Raises ImportError naming the extra when lm-eval is missing, ValueError for unknown tasks. On the
    non-zero ranks of a distributed run lm-eval returns nothing, and so does this (an empty dict).
    """
    task_list = _check_args(tasks, limit, batch_size, include_path)
    if not isinstance(device, str) or not device:
        raise ValueError(f"device: expected a torch device string such as 'cpu' or 'cuda:0', got {device!r}")
    model_args = _model_args(model_dir, dtype)
    lm_eval, TaskManager = _import_harness()
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    known = set(manager.all_tasks)
    missing = [t for t in task_list if t not in known]
    if missing:
        where = f" or in {str(include_path)!r}" if include_path is not None else ""
        raise ValueError(f"tasks: {missing} are not lm-eval tasks (none of the built-in ones{where}); list them with "
                         "`lm-eval ls tasks`, or pass include_path= the folder of your task YAMLs")
    out = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=task_list, num_fewshot=num_fewshot,
                                  batch_size=batch_size, device=device, limit=limit, task_manager=manager,
                                  log_samples=False, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed)
    if out is None:  # simple_evaluate returns None on non-zero ranks of a distributed run
        return {}
    keep = ("results", "groups", "versions", "n-samples", "higher_is_better", "config")
    result = _jsonable({k: out[k] for k in keep if k in out})
    result["lm_eval_version"] = getattr(lm_eval, "__version__", "unknown")
    return result
