"""Write the pruned model so that plain ``from_pretrained`` loads it, atomically.

The output directory is assembled in a temporary sibling directory and renamed into place at the end, so
an interrupted run never leaves a half-written model behind; an existing non-empty directory is refused
unless ``overwrite=True``. Contents: ``save_pretrained`` weights (safetensors) and config, the tokenizer,
``plan.json`` and ``cka.png`` (the CKA heatmap with segments and removed blocks marked).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..plan import Plan
from ..similarity.heatmap import save_cka_heatmap


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse (before any expensive work) an output directory that would be clobbered without consent."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output: {str(out)!r} exists and is not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"output: directory {str(out)!r} exists and is not empty; pass --overwrite "
                         "(overwrite=True) to replace it, or choose another path")
    return out


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
    if out.exists():
        if any(out.iterdir()) and not overwrite:
            raise ValueError(f"output: {str(out)!r} appeared while pruning and is not empty; pass --overwrite")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


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
