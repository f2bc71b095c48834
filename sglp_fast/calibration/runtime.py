"""Layer-by-layer calibration: every block's outputs for the observers (CKA), the calibration loss, and every
block's gradient norms (GradNorm), holding one block's weights and one batch's activations at a time.

Order (layer-major): embed all batches once; for each block l: bring its weights to the device, run every
batch, hand (input, output) to the observers, cache the outputs as block l+1's inputs, free the block. Then
the loss on the final hidden states, and the top-down backward (see ``gradients.py``). The fast path
(everything already on the device) runs the same code with no copies, so both give the same numbers.
"""
from __future__ import annotations

import contextlib
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
from ..sizes import parse_bytes
from ..progress import bar as progress_bar
from ..progress import shown
from . import losses as G
from ..models import get_adapter
from ..models.base import BlockAdapter, BlockCall
from .devices import allocator_cap, resolve_device
from .memory import BudgetTooSmall, block_call_bytes, plan_memory
from .store import TieredStore, free_memory_bytes
from .checkpoint import PassCheckpoint, fingerprint, saved_windows_per_call
from .kept_inputs import KeptInputs
from .weights import BlockWeights, NonBlockModules, module_bytes

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
              checkpoint_dir: str | os.PathLike | None = None, resume: bool = False,
              prefetch: bool | None = None, windows_per_call: int | None = None) -> CalibrationResult:
    """Run the calibration passes; see the module docstring and docs/contracts.md for the contract.

    ``keep_inputs=m``: keep every block's dense input for the leading batches holding >= m windows (all of
    them when the set is smaller) and return them as ``result.kept_inputs`` (a ``KeptInputs`` handle, which
    the caller must close); 0 frees everything. ``seed`` is accepted for compatibility and unused: the
    pass draws no random numbers (it no longer reseeds the caller's global RNG).
    ``checkpoint_dir``: save every block's outputs there as the pass goes (``checkpoint.py``); ``resume=True``
    continues the pass a killed run left there (same model, calibration and settings, else an error): the
    result is bit-identical to an uninterrupted run. The caller removes the checkpoint when it is done with it
    (``result.checkpoint.remove()``).
    ``prefetch``: bring block l+1's weights in (background thread; pinned memory and a side stream on CUDA)
    while block l computes: at most two blocks in memory, the same results; None = on where it helps
    (lazy or copied weights; ``weights.BlockWeights``) and the device budget holds the second block.
    ``windows_per_call``: the forward runs up to this many windows of consecutive batches of one shape
    through a block in one call (concatenated, split back: the same values up to float rounding; bigger
    matrix products keep a GPU busy); None = ``default_windows_per_call``, 1 = one batch per call.
    """
    t_start = time.perf_counter()
    adapter = get_adapter(model_or_adapter, generic=generic)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype: expected a torch.dtype such as torch.float32, got {dtype!r}")
    batches = _validate_batches(batches, adapter)
    observers = _validate_observers(observers)
    check_speedups(windows_per_call, prefetch)
    kept_batches = _kept_batches(batches, keep_inputs)
    device = _first_device(adapter) if device is None else resolve_device(device)
    model = adapter.model
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    weights = cache = None
    cap = contextlib.ExitStack()
    try:
        act_dtype = dtype or next((p.dtype for p in adapter.blocks.parameters() if p.is_floating_point()), torch.float32)
        weights = BlockWeights(adapter, device, dtype, prefetch=prefetch)
        if resume and checkpoint_dir is not None and windows_per_call is None:
            windows_per_call = saved_windows_per_call(checkpoint_dir)  # continue with the first run's grouping
        plan, budgets, checked_dir, windows_per_call = _plan(adapter, weights, batches, gradients, act_dtype,
                                                             device, max_device_memory, max_cpu_memory,
                                                             offload_dir, kept_batches, prefetch, windows_per_call)
        # the budget holds for the allocator's reserve too, not only the tensors (devices.allocator_cap)
        cap.enter_context(allocator_cap(device, parse_bytes(max_device_memory, "max_device_memory")))
        checkpoint = None
        if checkpoint_dir is not None:
            checkpoint = PassCheckpoint(checkpoint_dir, fingerprint(adapter, batches, act_dtype, device, gradients,
                                                                    windows_per_call),
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
                          progress, t_start, kept_batches, checkpoint, windows_per_call)
            result.checkpoint = checkpoint
        if result.kept_inputs is not None:
            cache = None  # the handle owns it now
        return result
    finally:
        if weights is not None:
            weights.discard_prefetch()  # only left over when the pass broke off
        if cache is not None:
            cache.close()
        cap.close()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


# --- how much runs at once: prefetch and windows per block call ------------------------------------------
def check_speedups(windows_per_call: int | None, prefetch: bool | None) -> None:
    """``calibrate``'s speed-up arguments (also checked by ``api.analyze`` before it loads anything)."""
    check_int("windows_per_call", windows_per_call, 1, optional=True,
              expected="a positive int (windows per block call) or None")
    if prefetch is not None and not isinstance(prefetch, bool):
        raise TypeError(f"prefetch: expected True, False or None (automatic), got {prefetch!r}")


# tokens per block call the automatic grouping aims at: on a GPU, enough rows for the matrix products to
# reach the tensor cores' rate at small widths (SmolLM2: 576); on a CPU past where bigger products stop paying
GPU_TOKENS_PER_CALL = 16384
CPU_TOKENS_PER_CALL = 2048


def _plan(adapter, weights, batches, gradients, act_dtype, device, max_device_memory, max_cpu_memory,
          offload_dir, kept_batches, prefetch, windows_per_call):
    """The memory plan and the windows per call. What was left automatic gives way to a budget too small for
    it (the budget is the hard limit, these are only speed-ups): first the prefetch's second block, then the
    grouped calls' working set."""
    def attempt(windows):
        windows = windows or default_windows_per_call(adapter, batches, device, act_dtype, max_device_memory,
                                                      weights.prefetch)
        return (*plan_memory(adapter, weights, batches, gradients, act_dtype, device, max_device_memory,
                             max_cpu_memory, offload_dir, kept_batches, prefetch=weights.prefetch,
                             windows_per_call=windows), windows)
    try:
        return attempt(windows_per_call)
    except BudgetTooSmall:
        if prefetch is None and weights.prefetch:
            weights.prefetch = False
            try:
                return attempt(windows_per_call)
            except BudgetTooSmall:
                pass
        if windows_per_call is not None:
            raise
        return attempt(1)


def default_windows_per_call(adapter: BlockAdapter, batches: list[dict], device, act_dtype: torch.dtype,
                             max_device_memory=None, prefetch: bool = False) -> int:
    """Windows per block call when the caller leaves it open.

    CPU: up to ``CPU_TOKENS_PER_CALL`` tokens, from the shapes alone, so that runs with other memory
    budgets or offload tiers compute the very same products (bit-identical results). GPU: up to
    ``GPU_TOKENS_PER_CALL`` tokens, and at most what a quarter of the device budget left after the block
    weights holds (``memory.block_call_bytes``); the rest of the budget is the caches'.
    """
    device = resolve_device(device)
    seq_len = max(int(b["input_ids"].shape[1]) for b in batches)
    target = GPU_TOKENS_PER_CALL if device.type == "cuda" else CPU_TOKENS_PER_CALL
    windows = min(max(1, target // seq_len), sum(int(b["input_ids"].shape[0]) for b in batches))
    if device.type == "cuda":
        budget = parse_bytes(max_device_memory, "max_device_memory")
        budget = budget if budget is not None else free_memory_bytes(device)
        itemsize = torch.tensor([], dtype=act_dtype).element_size()
        block = max(module_bytes(b, act_dtype) for b in adapter.blocks)
        room = budget - (2 if prefetch else 1) * block
        per_window = block_call_bytes(adapter, 1, seq_len, itemsize)
        windows = min(windows, max(1, room // (4 * per_window)))
    return int(windows)


def _call_groups(batches: list[dict], windows_per_call: int, kept_batches: int) -> list[list[int]]:
    """Consecutive batches of one shape and the same keys, up to ``windows_per_call`` windows together.

    A group never straddles the kept batches' boundary: kept and freed outputs never share a call.
    """
    groups: list[list[int]] = []
    windows = 0
    for b, batch in enumerate(batches):
        n = int(batch["input_ids"].shape[0])
        prev = batches[groups[-1][-1]] if groups else None
        if (prev is not None and windows + n <= windows_per_call and b != kept_batches
                and prev["input_ids"].shape[1:] == batch["input_ids"].shape[1:] and prev.keys() == batch.keys()):
            groups[-1].append(b)
            windows += n
        else:
            groups.append([b])
            windows = n
    return groups


class _Unmergeable(Exception):
    """Two batches' block arguments differ in a way concatenation cannot express: call them one by one."""


def _merge_values(values: list, sizes: list[int]):
    """One argument for the concatenated batches: a shared value as is (broadcast over the windows when its
    first dimension is 1), per-window tensors concatenated along the batch dimension."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        if not all(isinstance(v, torch.Tensor) and v.dtype == first.dtype and v.device == first.device
                   and v.dim() == first.dim() for v in values):
            raise _Unmergeable
        per_window = first.dim() > 0 and all(v.shape[0] == n and v.shape[1:] == first.shape[1:]
                                             for v, n in zip(values, sizes))
        shared = all(v is first or (v.shape == first.shape and torch.equal(v, first)) for v in values[1:])
        if shared and (first.dim() == 0 or first.shape[0] == 1 or not per_window):
            return first
        if per_window:
            return torch.cat(values, dim=0)
        raise _Unmergeable
    if isinstance(first, dict):
        if any(not isinstance(v, dict) or v.keys() != first.keys() for v in values):
            raise _Unmergeable
        return {k: _merge_values([v[k] for v in values], sizes) for k in first}
    if isinstance(first, (tuple, list)):
        if any(type(v) is not type(first) or len(v) != len(first) for v in values):
            raise _Unmergeable
        items = [_merge_values([v[i] for v in values], sizes) for i in range(len(first))]
        return type(first)(*items) if hasattr(first, "_fields") else type(first)(items)
    try:
        if all(v is first or bool(v == first) for v in values[1:]):
            return first
    except (TypeError, ValueError, RuntimeError):
        pass
    raise _Unmergeable


def _merged_call(calls: list[BlockCall], sizes: list[int]) -> BlockCall | None:
    """The block arguments of the concatenated batches, or None when they cannot be merged."""
    try:
        args = _merge_values([c.args for c in calls], sizes)
        kwargs = _merge_values([c.kwargs for c in calls], sizes)
    except _Unmergeable:
        return None
    return BlockCall(tuple(args), dict(kwargs))


def _run_group(adapter: BlockAdapter, block, xs: list[torch.Tensor], calls: list[BlockCall],
               memo: dict) -> list[torch.Tensor]:
    """Block outputs for the batches ``xs``: one call on their concatenation when their arguments merge
    (``memo`` keeps merged arguments: blocks share them), one call per batch otherwise."""
    if len(xs) == 1:
        return [adapter.call_block(block, xs[0], calls[0])]
    sizes = [int(x.shape[0]) for x in xs]
    # keyed by the argument objects, which the model's forward made once for all its blocks
    key = tuple((tuple(map(id, c.args)), tuple((k, id(v)) for k, v in c.kwargs.items())) for c in calls)
    if key not in memo:
        memo[key] = (_merged_call(calls, sizes), calls)  # the calls stay referenced: their ids stay theirs
    merged = memo[key][0]
    if merged is None:
        return [adapter.call_block(block, x, c) for x, c in zip(xs, calls)]
    y = adapter.call_block(block, torch.cat(xs, dim=0), merged)
    if y.shape[0] != sum(sizes):
        raise RuntimeError(f"{type(block).__name__} returned {y.shape[0]} rows for {sum(sizes)} concatenated "
                           "windows; pass windows_per_call=1")
    return [part.clone() for part in y.split(sizes, dim=0)]  # owned copies: no kept view pins the whole call


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


def _observe(l: int, b: int, x: torch.Tensor, y: torch.Tensor, observers, mask: torch.Tensor) -> tuple[float, float]:
    """Hand block ``l``'s (input, output) of batch ``b`` to the observers; its influence and relative update sums."""
    _check_finite(y, f"block {l} (batch {b})", y.dtype)
    x32, y32 = G.at_least_fp32(x), G.at_least_fp32(y)
    for obs in observers:
        obs.observe(l, x32, y32, b, mask)
    cos = F.cosine_similarity(x32, y32, dim=-1)
    infl = float((1.0 - cos)[mask].double().sum())
    rel = (y32 - x32).norm(dim=-1) / x32.norm(dim=-1).clamp_min(torch.finfo(x32.dtype).tiny)
    return infl, float(rel[mask].double().sum())


def _run(adapter, weights, batches, observers, gradients, device, act_dtype, cache, plan, progress,
         t_start, kept_batches: int = 0, checkpoint: PassCheckpoint | None = None,
         windows_per_call: int = 1) -> CalibrationResult:
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
    groups = _call_groups(batches, windows_per_call, kept_batches if not gradients else 0)
    waited = weights.wait_s
    merged_calls: dict = {}
    with torch.no_grad():
        for l in range(n_blocks):
            replay = checkpoint is not None and l < checkpoint.completed  # done before the run was killed
            bar.set_description("replaying" if replay else "calibrating")
            block = None if replay else weights.acquire(l, next_index=l + 1 if l + 1 < n_blocks else None)
            for group in groups:
                xs = [cache.get(l, b) for b in group]
                if replay:
                    ys = [checkpoint.load(l + 1, b, device) for b in group]
                else:
                    ys = _run_group(adapter, block, xs, [calls[b][l] for b in group], merged_calls)
                for b, x, y in zip(group, xs, ys):
                    if checkpoint is not None and not replay:
                        checkpoint.save(l + 1, b, y)
                    infl, rel = _observe(l, b, x, y, observers, masks[b])
                    infl_sum[l] += infl
                    rel_sum[l] += rel
                    cache.put(l + 1, b, y)
                del xs, ys
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
    timings["forward_weights_wait_s"] = weights.wait_s - waited  # reading blocks the forward waited for
    timings["windows_per_call"] = windows_per_call

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
            block = weights.acquire(l, next_index=l - 1 if l > 0 else None)
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
