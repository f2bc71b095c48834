"""Layer-by-layer calibration: every block's outputs for the observers (CKA), the calibration loss, and every
block's gradient norms (GradNorm), holding one block's weights and one batch's activations at a time.

Order (layer-major): embed all batches once; for each block l: bring its weights to the device, run every
batch, hand (input, output) to the observers, cache the outputs as block l+1's inputs, free the block. Then
the loss on the final hidden states, and the top-down backward (see ``gradients.py``). The fast path
(everything already on the device) runs the same code with no copies, so both give the same numbers.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import distributed as dist
from ..checks import check_int
from ..progress import bar as progress_bar
from ..progress import shown
from . import losses as G
from ..models import get_adapter
from ..models.base import BlockAdapter, BlockCall
from .memory import plan_memory
from .store import TieredStore
from .checkpoint import PassCheckpoint, fingerprint
from .kept_inputs import KeptInputs
from .weights import BlockWeights, NonBlockModules

log = logging.getLogger(__name__)


class NonFiniteActivationError(ValueError):
    """A block produced NaN/inf: named block and batch, usually a low-precision overflow."""


@dataclass
class CalibrationResult:
    """Everything one calibration run measured. Gradient fields are None when ``gradients=False``."""

    num_blocks: int
    loss: float
    tokens: int
    loss_kind: str
    loss_terms: int
    block_influence: np.ndarray
    grad_norm: np.ndarray | None = None
    weight_norm: np.ndarray | None = None
    taylor: np.ndarray | None = None
    param_grad_norms: dict[str, float] = field(default_factory=dict)
    # mean over tokens of ||h_out - h_in|| / ||h_in||: how far the block moves the residual stream
    relative_update: np.ndarray | None = None
    # with keep_inputs > 0: the dense input of every block for the leading batches (the caller closes it)
    kept_inputs: KeptInputs | None = None
    checkpoint: PassCheckpoint | None = None  # with checkpoint_dir: the saved pass (remove() when done)
    timings: dict[str, float] = field(default_factory=dict)
    memory_plan: str = ""
    cache_peak_bytes: dict[str, int] = field(default_factory=dict)


# --- input validation ------------------------------------------------------------------------------------
def _validate_batches(batches, adapter: BlockAdapter) -> list[dict]:
    if isinstance(batches, dict) or not isinstance(batches, Sequence):
        raise TypeError(
            f"batches: expected a list of dicts {{'input_ids': LongTensor[b, s], 'attention_mask': ...}}, got "
            f"{type(batches).__name__}; wrap a single batch as [batch]"
        )
    if len(batches) == 0:
        raise ValueError("batches: the calibration set is empty; pass at least one batch of token ids")
    vocab = getattr(adapter.config, "vocab_size", None)
    max_pos = adapter.max_positions()
    out = []
    for i, batch in enumerate(batches):
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise TypeError(f"batches[{i}]: expected a dict with 'input_ids', got {type(batch).__name__}")
        ids = batch["input_ids"]
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(
                f"batches[{i}]['input_ids']: expected an integer torch.Tensor [batch, seq], got "
                f"{type(ids).__name__}{'' if not isinstance(ids, torch.Tensor) else ' ' + str(ids.dtype)}; "
                "use torch.tensor(ids, dtype=torch.long)"
            )
        if ids.dim() != 2 or ids.numel() == 0:
            raise ValueError(f"batches[{i}]['input_ids']: expected shape [batch, seq] with both > 0, got {tuple(ids.shape)}")
        if vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(
                f"batches[{i}]['input_ids']: token ids must lie in [0, {vocab}) for this model, got "
                f"[{int(ids.min())}, {int(ids.max())}]; tokenize with the model's own tokenizer"
            )
        if max_pos is not None and ids.shape[1] > max_pos:
            raise ValueError(
                f"batches[{i}]: sequence length {ids.shape[1]} exceeds the model's maximum of {max_pos} positions "
                f"(config max_position_embeddings); truncate or split the calibration text to <= {max_pos} tokens"
            )
        clean = {"input_ids": ids.long()}
        for key in ("attention_mask", "token_type_ids"):
            value = batch.get(key)
            if value is None:
                continue
            if not isinstance(value, torch.Tensor) or value.shape != ids.shape:
                raise ValueError(
                    f"batches[{i}]['{key}']: expected a tensor of shape {tuple(ids.shape)} like input_ids, got "
                    f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}"
                )
            clean[key] = value.long()
        if "attention_mask" in clean and int(clean["attention_mask"].sum()) == 0:
            raise ValueError(f"batches[{i}]['attention_mask']: masks every token; drop the batch or fix the mask")
        out.append(clean)
    return out


def _validate_observers(observers) -> list:
    if observers is None:
        return []
    if not isinstance(observers, (list, tuple)):
        observers = [observers]
    for i, obs in enumerate(observers):
        if not callable(getattr(obs, "observe", None)):
            raise TypeError(
                f"observers[{i}]: expected an object with .observe(layer, block_input, block_output, batch_id, "
                f"mask), got {type(obs).__name__}"
            )
    return list(observers)


def _first_device(adapter: BlockAdapter) -> torch.device:
    emb = adapter.model.get_input_embeddings() if hasattr(adapter.model, "get_input_embeddings") else None
    for p in (emb.parameters() if emb is not None else adapter.model.parameters()):
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _check_finite(t: torch.Tensor, what: str, dtype: torch.dtype) -> None:
    if not bool(torch.isfinite(t).all()):
        if dtype in (torch.float16, torch.bfloat16):
            hint = f" in {dtype}: low-precision overflow is the usual cause; rerun with dtype=torch.float32"
        else:
            hint = f" in {dtype}: check the weights and the inputs of this block (inf/NaN in the checkpoint?)"
        raise NonFiniteActivationError(f"{what} produced NaN/inf{hint}")


# --- the driver ------------------------------------------------------------------------------------------
def calibrate(model_or_adapter, batches, *, observers=(), gradients: bool = True, device=None, dtype=None,
              max_device_memory=None, max_cpu_memory=None, offload_dir=None, seed: int = 0,
              progress: bool = True, generic: bool = False, keep_inputs: int = 0,
              checkpoint_dir: str | os.PathLike | None = None, resume: bool = False) -> CalibrationResult:
    """Run the calibration passes; see the module docstring and docs/contracts.md for the contract.

    ``keep_inputs=m``: keep every block's dense input for the leading batches holding >= m windows (all of
    them when the set is smaller) and return them as ``result.kept_inputs`` (a ``KeptInputs`` handle, which
    the caller must close); 0 frees everything. ``seed`` is accepted for compatibility and unused: the
    pass draws no random numbers (it no longer reseeds the caller's global RNG).
    ``checkpoint_dir``: save every block's outputs there as the pass goes (``checkpoint.py``); ``resume=True``
    continues the pass a killed run left there (same model, calibration and settings, else an error): the
    result is bit-identical to an uninterrupted run. The caller removes the checkpoint when it is done with it
    (``result.checkpoint.remove()``).
    """
    t_start = time.perf_counter()
    adapter = get_adapter(model_or_adapter, generic=generic)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype: expected a torch.dtype such as torch.float32, got {dtype!r}")
    batches = _validate_batches(batches, adapter)
    observers = _validate_observers(observers)
    kept_batches = _kept_batches(batches, keep_inputs)
    device = _first_device(adapter) if device is None else torch.device(device)
    model = adapter.model
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    weights = BlockWeights(adapter, device, dtype)
    cache = None
    try:
        act_dtype = dtype or next((p.dtype for p in adapter.blocks.parameters() if p.is_floating_point()), torch.float32)
        plan, budgets, checked_dir = plan_memory(adapter, weights, batches, gradients, act_dtype, device,
                                           max_device_memory, max_cpu_memory, offload_dir, kept_batches)
        checkpoint = None
        if checkpoint_dir is not None:
            checkpoint = PassCheckpoint(checkpoint_dir, fingerprint(adapter, batches, act_dtype, device, gradients),
                                        resume=resume, slot_bytes=plan.activation_slot_bytes)
            plan.checkpoint_bytes = (adapter.num_blocks + 1) * plan.activation_slot_bytes
        elif resume:
            raise ValueError("resume: needs checkpoint_dir (the folder of the run to continue)")
        cache = TieredStore(device, budgets["device"], budgets["cpu"], checked_dir)
        with shown(progress):
            if progress:
                log.info("%s", plan)
                if checkpoint is not None and checkpoint.completed:
                    log.info("resuming: %d of %d blocks are in the checkpoint (replayed, not run)",
                             checkpoint.completed, adapter.num_blocks)
            result = _run(adapter, weights, batches, observers, gradients, device, act_dtype, cache, plan,
                          progress, t_start, kept_batches, checkpoint)
            result.checkpoint = checkpoint
        if result.kept_inputs is not None:
            cache = None  # the handle owns it now
        return result
    finally:
        if cache is not None:
            cache.close()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _kept_batches(batches: list[dict], keep_inputs: int) -> int:
    """How many leading batches hold at least ``keep_inputs`` windows (all of them if the set is smaller)."""
    check_int("keep_inputs", keep_inputs, 0, expected="a non-negative int (windows)")
    windows = 0
    for i, batch in enumerate(batches):
        if windows >= keep_inputs:
            return i
        windows += int(batch["input_ids"].shape[0])
    return len(batches)


def _free_unkept(cache, slot, n_batches: int, kept_batches: int) -> None:
    for b in range(kept_batches, n_batches):
        cache.free(slot, b)


def _run(adapter, weights, batches, observers, gradients, device, act_dtype, cache, plan, progress,
         t_start, kept_batches: int = 0, checkpoint: PassCheckpoint | None = None) -> CalibrationResult:
    n_blocks, n_batches = adapter.num_blocks, len(batches)
    kind = G.loss_kind(adapter)
    counts = [G.loss_count(kind, b) for b in batches]
    # data-parallel: this rank's batches are a share of the windows; the counts and sums are global
    total_terms, tokens = (int(x) for x in dist.all_reduce_sum(
        np.array([sum(counts), sum(int(G.token_mask(b).sum()) for b in batches)], dtype=np.float64),
        tag="calibration_counts"))
    if total_terms == 0:
        raise ValueError(
            f"batches: no {kind} loss terms (every sequence has fewer than 2 real tokens); pass longer sequences"
        )
    timings: dict[str, float] = {}

    # 1. embed every batch once; record each block's call arguments (masks, positions, rotary tables)
    t0 = time.perf_counter()
    calls: list[list[BlockCall]] = []
    masks: list[torch.Tensor] = []
    dev_batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    with NonBlockModules(adapter, device, weights.dtype):
        for b, batch in enumerate(dev_batches):
            h0, block_calls = adapter.capture_block_calls(batch)
            _check_finite(h0, f"the embedding (batch {b})", h0.dtype)
            cache.put(0, b, h0.to(act_dtype))
            if checkpoint is not None and checkpoint.completed == 0:
                checkpoint.save(0, b, h0.to(act_dtype))
            calls.append(block_calls)
            masks.append(G.token_mask(batch))
    timings["embed_s"] = time.perf_counter() - t0

    # 2. forward, layer-major
    infl_sum = np.zeros(n_blocks, dtype=np.float64)
    rel_sum = np.zeros(n_blocks, dtype=np.float64)
    t0 = time.perf_counter()
    bar = progress_bar(n_blocks, "calibrating", progress)
    with torch.no_grad():
        for l in range(n_blocks):
            replay = checkpoint is not None and l < checkpoint.completed  # done before the run was killed
            bar.set_description("replaying" if replay else "calibrating")
            block = None if replay else weights.acquire(l)
            for b in range(n_batches):
                x = cache.get(l, b)
                if replay:
                    y = checkpoint.load(l + 1, b, device)
                else:
                    y = adapter.call_block(block, x, calls[b][l])
                    if checkpoint is not None:
                        checkpoint.save(l + 1, b, y)
                _check_finite(y, f"block {l} (batch {b})", y.dtype)
                x32, y32 = G.at_least_fp32(x), G.at_least_fp32(y)
                for obs in observers:
                    obs.observe(l, x32, y32, b, masks[b])
                cos = F.cosine_similarity(x32, y32, dim=-1)
                infl_sum[l] += float((1.0 - cos)[masks[b]].double().sum())
                rel = (y32 - x32).norm(dim=-1) / x32.norm(dim=-1).clamp_min(torch.finfo(x32.dtype).tiny)
                rel_sum[l] += float(rel[masks[b]].double().sum())
                del x32, y32, x
                cache.put(l + 1, b, y)
                del y
            if not gradients:
                _free_unkept(cache, l, n_batches, kept_batches)
            if not replay:
                weights.release(l, block)
                if checkpoint is not None:
                    checkpoint.block_done(l)
            del block
            bar.update(1)
    bar.close()
    infl_sum, rel_sum = dist.all_reduce_sum(np.stack([infl_sum, rel_sum]), tag="forward_stats")
    timings["forward_s"] = time.perf_counter() - t0

    # 3. loss on the final hidden states (and dL/dh_L per batch)
    t0 = time.perf_counter()
    loss_total = 0.0
    with NonBlockModules(adapter, device, weights.dtype):
        for b in range(n_batches):
            h = cache.get(n_blocks, b).detach()
            if gradients:
                h.requires_grad_(True)
                with torch.enable_grad():
                    s = G.loss_sum(kind, adapter.head_output(h, dev_batches[b]), dev_batches[b])
                    (s / total_terms).backward()
                cache.put("grad", b, G.at_least_fp32(h.grad))
            else:
                with torch.no_grad():
                    s = G.loss_sum(kind, adapter.head_output(h, dev_batches[b]), dev_batches[b])
            _check_finite(s.detach(), f"the loss (batch {b})", h.dtype)
            loss_total += float(s.detach())
            del h, s
        _free_unkept(cache, n_blocks, n_batches, kept_batches)
    loss_total = dist.all_reduce_sum(float(loss_total), tag="loss")
    timings["loss_s"] = time.perf_counter() - t0
    result = CalibrationResult(num_blocks=n_blocks, loss=loss_total / total_terms, tokens=tokens, loss_kind=kind,
                               loss_terms=total_terms, block_influence=infl_sum / max(tokens, 1),
                               relative_update=rel_sum / max(tokens, 1),
                               memory_plan=str(plan))

    # 4. top-down backward: GradNorm
    if gradients:
        t0 = time.perf_counter()
        grad_norm, weight_norm, taylor = (np.zeros(n_blocks) for _ in range(3))
        stats = G.BlockGradStats()
        bar = progress_bar(n_blocks, "gradients", progress)
        for l in reversed(range(n_blocks)):
            block = weights.acquire(l)
            named = list(block.named_parameters())
            for _, p in named:
                p.requires_grad_(True)
                p.grad = None
            for b in range(n_batches):
                x = cache.get(l, b).detach().requires_grad_(l > 0)
                call = calls[b][l]
                with torch.enable_grad():
                    y = adapter.call_block(block, x, call)
                    y.backward(cache.get("grad", b).to(y.dtype))
                if l > 0:
                    cache.put("grad", b, G.at_least_fp32(x.grad))
                del x, y
            _free_unkept(cache, l, n_batches, kept_batches)
            # data-parallel: the block's gradient over every rank's windows, then the norms
            if dist.is_distributed():
                for _, p in named:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                dist.all_reduce_tensors_([p.grad for _, p in named], tag="gradients")
            grad_norm[l], weight_norm[l], taylor[l] = stats.record(adapter.block_prefix(l), named)
            for _, p in named:
                p.grad = None
                p.requires_grad_(False)
            weights.release(l, block)
            del block, named
            bar.update(1)
        bar.close()
        cache.free_slot("grad", n_batches)
        timings["backward_s"] = time.perf_counter() - t0
        result.grad_norm, result.weight_norm, result.taylor = grad_norm, weight_norm, taylor
        result.param_grad_norms = stats.param_grad_norms
    timings["total_s"] = time.perf_counter() - t_start
    timings["tokens_per_s_forward"] = tokens / max(timings["forward_s"], 1e-12)
    if gradients:
        timings["tokens_per_s_backward"] = tokens / max(timings["loss_s"] + timings["backward_s"], 1e-12)
    timings["tokens_per_s_total"] = tokens / max(timings["total_s"], 1e-12)
    result.timings = timings
    result.cache_peak_bytes = dict(cache.peak)
    if kept_batches:
        result.kept_inputs = KeptInputs(adapter=adapter, weights=weights, store=cache, calls=calls[:kept_batches],
                                        batches=dev_batches[:kept_batches], loss_kind=kind, device=device,
                                        total_windows=sum(int(b["input_ids"].shape[0]) for b in batches))
    if progress:
        rate = f"{timings['tokens_per_s_forward']:.0f} tok/s forward"
        if gradients:
            rate += f", {timings['tokens_per_s_backward']:.0f} tok/s loss+backward"
        log.info("calibrated %d blocks on %d tokens in %.2f s (%s); loss %.4f", n_blocks, tokens,
                 timings["total_s"], rate, result.loss)
    return result
