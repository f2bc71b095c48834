"""Perplexity on token windows, parameter counts and process memory of a (pruned) model.

Perplexity uses the same windows as calibration (``calibration.text.tokenize_windows``): every window is scored on its
own (no context carried over), each of its tokens 1..s-1 is predicted from the ones before it, and
PPL = exp(sum of NLL / number of predicted tokens) over all windows, accumulated in float64.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from .calibration import calibrate
from .checks import check_int
from .models import get_adapter

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is a dev dependency
    psutil = None


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # number of predicted tokens
    memory_plan: str = ""  # streamed_perplexity: the plan it ran under (as calibration prints it)


def is_causal_lm(model: Any) -> bool:
    """True for decoder-only LMs (next-token perplexity is defined), False for encoders and seq2seq."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return False
    try:
        return get_adapter(model).kind == "causal_lm"
    except (TypeError, ValueError):  # an architecture without an adapter: judge by its head
        return hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None


def _logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    try:
        out = model(input_ids=input_ids, use_cache=False)
    except TypeError:
        out = model(input_ids=input_ids)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits


def _check_windows(model: Any, input_ids: Any) -> None:
    """Windows of int64 token ids, >= 2 tokens, within the model's positions, for a causal LM."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(f"input_ids: expected an int64 tensor [n_windows, seq_len], got "
                         f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                         f"{tuple(getattr(input_ids, 'shape', ()))}")
    if input_ids.shape[1] < 2:
        raise ValueError(f"input_ids: windows need at least 2 tokens to predict one, got seq_len={input_ids.shape[1]}")
    if not is_causal_lm(model):
        raise ValueError(f"model: perplexity needs a decoder-only causal LM, got {type(model).__name__} (an "
                         "encoder); evaluate encoders on their downstream task instead")
    get_adapter(model).check_window_length(input_ids.shape[1])  # as calibration refuses it (api.analyze)


def streamed_perplexity(model: Any, input_ids: torch.Tensor, batch_size: int = 4, device: Any = None,
                        dtype: torch.dtype | None = None, max_memory: Any = None,
                        offload_dir: Any = None) -> PerplexityResult:
    """``perplexity`` computed the calibration way: block by block, one block's weights in memory at a time,
    so a lazily loaded (possibly pruned and compensated) model is evaluated without ever being materialized.
    ``max_memory``/``offload_dir``: the run's budget holds here too (the read-ahead of the next block gives
    way to it, as in calibration).

    The same number as ``perplexity`` (the mean next-token NLL over every window), up to float summation order.
    """
    _check_windows(model, input_ids)
    batch_size = check_int("batch_size", batch_size, 1)
    batches = [{"input_ids": input_ids[i:i + batch_size]} for i in range(0, input_ids.shape[0], batch_size)]
    result = calibrate(model, batches, gradients=False, device=device, dtype=dtype, progress=False,
                       max_device_memory=max_memory, offload_dir=offload_dir)
    return PerplexityResult(perplexity=math.exp(result.loss), nll=result.loss, tokens=result.loss_terms,
                            memory_plan=result.memory_plan)


@torch.no_grad()
def perplexity(model: Any, input_ids: torch.Tensor, batch_size: int = 4, device: Any = None) -> PerplexityResult:
    """Perplexity of a causal LM on windows ``input_ids`` [n, s] (s >= 2)."""
    _check_windows(model, input_ids)
    batch_size = check_int("batch_size", batch_size, 1)
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll = 0.0
    count = 0
    try:
        for i in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[i:i + batch_size].to(device)
            logits = _logits(model, ids)[:, :-1].float()
            targets = ids[:, 1:]
            logp = torch.log_softmax(logits, dim=-1)
            nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            total_nll += float(nll.double().sum())
            count += targets.numel()
    finally:
        model.train(was_training)
    mean = total_nll / count
    return PerplexityResult(perplexity=math.exp(mean), nll=mean, tokens=count)


def count_parameters(model: Any) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def block_parameter_counts(model: Any) -> list[int]:
    return [sum(p.numel() for p in block.parameters()) for block in get_adapter(model).blocks]


def rss_bytes() -> int:
    """This process's resident memory now (psutil), or its peak RSS where psutil is missing."""
    if psutil is not None:
        return int(psutil.Process().memory_info().rss)
    import resource  # noqa: PLC0415  (POSIX only: imported where psutil is missing)

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # pragma: no cover
