"""Write the pruned model so that plain ``from_pretrained`` loads it, atomically.

The output directory is assembled in a temporary sibling directory and renamed into place at the end, so
an interrupted run never leaves a half-written model behind; an existing non-empty directory is refused
unless ``overwrite=True``. Contents: ``save_pretrained`` weights (safetensors) and config, the tokenizer,
``plan.json`` and ``cka.png`` (the CKA heatmap with segments and removed blocks marked).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..plan import PLAN_FORMAT, Plan
from ..similarity.heatmap import save_cka_heatmap
from .gguf import write_pruned_gguf

GGUF_NAME = "model.gguf"


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool, *,
                     protect: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Refuse, before any expensive work, an output folder that would be clobbered without consent.

    ``overwrite`` replaces only an empty folder or an earlier sglp output (a folder whose ``plan.json`` is
    an sglp plan): never a folder of other files, the model being read (``protect``) or a folder holding it.
    The parent must be creatable and writable.
    """
    out = Path(os.path.abspath(os.fspath(output_dir)))
    if out.is_symlink():  # write where the link points (replacing the link would leave it as .NAME.old-*)
        out = Path(os.path.realpath(out))
    for parent in [out, *out.parents]:
        if parent.exists():
            if not parent.is_dir():
                what = "the output path" if parent == out else f"{str(parent)!r} (on the output path)"
                raise ValueError(f"output: {what} is a file, not a directory; choose another --output")
            break
    real_out = Path(os.path.realpath(out))
    for source in protect:  # compared through symlinks: a link to the model's folder is the model's folder
        src = Path(os.path.realpath(os.fspath(source)))
        if src == real_out or real_out in src.parents:
            raise ValueError(f"output: {str(out)!r} holds the model being read ({str(src)!r}); choose another path")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"output: folder {str(out)!r} exists and is not empty; pass --overwrite "
                             "(overwrite=True) to replace an earlier sglp output, or choose another path")
        if not is_sglp_output(out):
            raise ValueError(f"output: --overwrite replaces only an earlier sglp output (a folder with an sglp "
                             f"plan.json), and {str(out)!r} is not one; it is left untouched: choose another path")
    existing = next(p for p in [out, *out.parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"output: cannot write in {str(existing)!r} (permission denied); choose a writable "
                         "--output")
    return out


def is_sglp_output(folder: Path) -> bool:
    """True when ``folder/plan.json`` is an sglp plan (the marker every saved output carries)."""
    marker = folder / "plan.json"
    try:
        with open(marker, encoding="utf-8") as f:
            head = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(head, dict) and head.get("format") == PLAN_FORMAT


def _strip_load_time_quantization(model: Any) -> None:
    """A GGUF checkpoint is dequantized at load; the saved weights are plain, so drop the GGUF marker."""
    qc = getattr(model.config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if str(method).lower().endswith("gguf"):
        del model.config.quantization_config
        for attr in ("hf_quantizer", "quantization_method"):
            if getattr(model, attr, None) is not None:
                setattr(model, attr, None)
        if hasattr(model, "is_quantized"):
            try:
                model.is_quantized = False
            except AttributeError:
                pass


def commit_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished temporary directory to ``out`` (replacing an old one only when allowed)."""
    _usual_modes(tmp)
    if out.exists():
        if any(out.iterdir()) and not (overwrite and is_sglp_output(out)):
            raise ValueError(f"output: {str(out)!r} appeared or changed while pruning and is not an sglp output "
                             "to replace; the new model is discarded, choose another path")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def _usual_modes(folder: Path) -> None:
    """Files as the umask says (0644 usually): some writers create them 0600 through temporary files."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)


def temporary_sibling(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the final directory gets the usual permissions
    return tmp


def heatmap_title(plan: Plan) -> str:
    name = os.path.basename(str(plan.model.get("id", "")).rstrip("/")) or "model"
    return f"{name}: CKA, {plan.k} segments, {len(plan.removed or ())} of {plan.num_blocks} blocks removed"


def save_pruned(model: Any, tokenizer: Any, plan: Plan, output_dir: str | os.PathLike,
                overwrite: bool = False) -> Path:
    """Write the (already pruned) model, tokenizer, plan.json and cka.png to ``output_dir`` atomically."""
    out = check_output_dir(output_dir, overwrite)
    tmp = temporary_sibling(out)
    try:
        _strip_load_time_quantization(model)
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        plan.save(tmp / "plan.json")
        save_cka_heatmap(tmp / "cka.png", plan.cka, plan.segments, plan.removed or (),
                         title=heatmap_title(plan))
        commit_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_pruned_gguf(src_gguf: str | os.PathLike, plan: Plan, output_dir: str | os.PathLike, overwrite: bool = False,
                     requantize: bool = False, check_config: bool = True) -> tuple[Path, dict[str, Any]]:
    """The pruned GGUF (``model.gguf``: kept tensors byte for byte in the source's quantization, compensated
    ones in F16, or requantized with ``requantize``), ``plan.json`` and ``cka.png`` in ``output_dir``, atomically.

    Loads with ``from_pretrained(output_dir, gguf_file="model.gguf")`` and with llama.cpp.
    """
    out = check_output_dir(output_dir, overwrite)
    tmp = temporary_sibling(out)
    try:
        info = write_pruned_gguf(src_gguf, plan, tmp / GGUF_NAME, requantize=requantize, check_config=check_config)
        plan.save(tmp / "plan.json")
        save_cka_heatmap(tmp / "cka.png", plan.cka, plan.segments, plan.removed or (), title=heatmap_title(plan))
        commit_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info["path"] = str(out / GGUF_NAME)
    return out, info
