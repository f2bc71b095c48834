"""The memory plan printed before calibration: what goes where, in bytes, the tiers' projected use, and the
predicted peak of device and host memory. ``max_device_memory`` (``--max-memory``) is a hard budget, checked
here before any work: below the least the run needs, a ValueError names both numbers and the fix.

What the peak counts: the bytes of the tensors the run holds at once, in whichever phase holds most:
  calibration  the weights (the whole model when resident; else one block, two with prefetch, plus its
               gradients with the backward; the embedding/head while they run), the activation cache's
               device/CPU tiers, the CKA items (``Budget.cka_item_bytes``), one block call's working set;
  selection    the same weights, the kept block inputs, one call's working set (with compensation: a
               batch's XᵀX and XᵀY, or a map folded into the block's MLP output weight and that weight's
               folded copy), the search's hidden states (each plan a pass checks holds one per kept window:
               one plan's in the least, as many plans as fit go together, ``Budget.search_plans`` at most),
               and the d x d float64 matrices compensation holds (``Budget.host_matrices``);
  fold at load (a lazy pruned model with compensation maps, e.g. the streamed perplexity) one block, the
               map folded into its MLP output weight as it is read: the folded copy, the fold's float64
               slices (``FOLD_SLICE_BYTES``) and, on a GPU, the map itself;
  solve        (compensation) between the passes: no block, the maps' solve temporaries
               (``SOLVE_MATRICES`` d x d, on the compute device) and the same matrices.
               With an offload folder and a budget the matrices spill past the room the rest of these two
               phases leaves them (``MemoryPlan.selection_room_bytes``, ``selection/matrix_store.py``), else
               the search stops there with the figure and the fix.
Calibration knows nothing of similarity or selection: the caller that runs them says what they hold, in a
``Budget`` passed as ``max_device_memory``. Not counted: the interpreter and libraries, allocator slack, the
model's loading, and what ``sglp prune`` does once the plan is made (perplexity, save), which holds less.
How it was checked: the peak RSS of a fresh process over its RSS before the model is built, glibc's mmap
threshold pinned at 1 MiB so that a freed tensor leaves the RSS at once (tests/test_memory_budget.py):
within 20% (resident, lazy, GradNorm, long windows, compensated, spilling to disk, compensated under a
budget with its matrices on disk: there the run's anonymous memory, the spilled matrices being mapped files).
On the CPU the device is the host: one budget, one peak.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..sizes import Limit, fmt_bytes, parse_bytes
from . import lazy_weights
from .devices import resolve_device
from .store import check_offload_dir, free_memory_bytes
from .weights import BlockWeights, module_bytes

FLOAT64 = 8
# d x d float64 temporaries of compensation's solve at once, beside the matrices it keeps: G and C without a
# fold, the eigenvectors and LAPACK's workspace (regularization._fold_terms), or a batch's XᵀX and XᵀY
SOLVE_MATRICES = 5
# float64 bytes of one slice of the MLP output weight while a map is folded into it (selection/compensation.py
# folds a slice at a time: a 70B down projection is 1.75 GiB in float64)
FOLD_SLICE_BYTES = 64 << 20


class BudgetTooSmall(ValueError):
    """The budget is below the least the run needs; ``least`` and ``limit`` in bytes (callers retry with it)."""

    def __init__(self, message: str, least: int, limit: int):
        super().__init__(message)
        self.least, self.limit = least, limit


@dataclass(frozen=True)
class Budget(Limit):
    """``max_device_memory`` with what the stages after calibration hold (passed through ``calibrate``).

    Why a type and not two more arguments of ``calibrate``: the budget must cover stages calibration knows
    nothing of; the caller that runs them says what they hold, and the plan counts it with the rest.
    ``limit``: the bytes (``parse_bytes`` reads it); ``name``: the argument the user set, which errors name.
    """

    name: str = "max_device_memory"
    cka_item_bytes: int = 0  # the CKA accumulator's items held at once (every layer's, to the last layer)
    cka_work_bytes: int = 0  # the CKA accumulator's transient when a batch completes (its panel, copies)
    host_matrices: int = 0  # d x d float64 matrices the selection holds at once on the host (compensation)
    host_matrices_bound: int = 0  # ... at most: every candidate plan of the search removing other runs
    solve_matrices: int = 0  # ... and only while one run's maps are chosen (its folds' decompositions)
    search_plans: int = 0  # plans the verified search checks in one pass over the blocks (0: no search)
    search_windows: int = 0  # windows those plans are checked on (0: every kept window)


@dataclass
class MemoryPlan:
    """What goes where, in bytes; ``str()`` is the table printed before calibration."""

    device: str
    weights_mode: str
    max_block_bytes: int
    other_weight_bytes: int
    activation_slot_bytes: int
    num_slots: int
    grad_bytes: int
    tiers: dict[str, int] = field(default_factory=dict)  # projected bytes per tier
    checkpoint_bytes: int = 0  # disk the resumable checkpoint takes (checkpoint_dir), 0 without one
    budgets: dict[str, int | None] = field(default_factory=dict)
    working_set_bytes: int = 0  # one block call (or the head) at its largest
    cka_item_bytes: int = 0
    cka_budget: int | None = None  # memory the CKA items may take before they spill to disk (None: its default)
    cka_cpu_budget: int | None = None  # on a GPU: the pinned CPU memory the items may take after that
    cka_tiers: dict = field(default_factory=dict)  # where the plan puts the items: device, cpu, disk bytes
    selection_bytes: int = 0  # compensation's d x d float64 matrices, on the host
    selection_bound_bytes: int = 0  # ... when every candidate plan removes other runs (the bound)
    selection_room_bytes: int | None = None  # what the budget leaves them in memory (None: no limit)
    selection_spills: bool = False  # past the room they go to offload_dir (else the search stops there)
    search_state_bytes: int = 0  # the hidden states one plan holds during a search pass (0: no search)
    search_plans_at_once: int | None = None  # plans a search pass may check together (None: no limit)
    peak_device_bytes: int = 0  # on the CPU: the same as peak_host_bytes
    peak_host_bytes: int = 0
    minimum_bytes: int = 0  # the least the budget must hold: everything but the caches that can spill
    limit_bytes: int | None = None  # max_device_memory (None: no limit)

    @property
    def on_cpu(self) -> bool:
        return torch.device(self.device).type == "cpu"

    def __str__(self) -> str:
        lines = [
            f"memory plan (compute device: {self.device}"
            + ("; the device is the host: one budget, one peak)" if self.on_cpu else ")"),
            f"  weights      : {self.weights_mode}",
            f"    largest block       {fmt_bytes(self.max_block_bytes):>12}",
            f"    embedding/head/norm {fmt_bytes(self.other_weight_bytes):>12}",
            f"  activations  : {self.num_slots:.3g} slot(s) x {fmt_bytes(self.activation_slot_bytes)}"
            f" + gradients {fmt_bytes(self.grad_bytes)}; one call's working set "
            f"{fmt_bytes(self.working_set_bytes)}",
        ]
        for tier in ("device", "cpu", "disk"):
            if tier == "device" and self.on_cpu:
                continue  # computing on the CPU: the CPU tier is the device
            budget = self.budgets.get(tier)
            b = "unbounded" if budget is None else fmt_bytes(budget)
            lines.append(f"    {tier:<6} {fmt_bytes(self.tiers.get(tier, 0)):>12}  (budget {b})")
        if self.cka_item_bytes:
            room = "its default" if self.cka_budget is None else fmt_bytes(self.cka_budget)
            where = (f"in memory up to {room}" if self.on_cpu or self.cka_cpu_budget is None else
                     f"on the device up to {room}, then pinned host memory up to {fmt_bytes(self.cka_cpu_budget)}")
            lines.append(f"  CKA items    : {fmt_bytes(self.cka_item_bytes)} ({where}, the rest on disk)")
        if self.search_state_bytes:
            at_once = ("as many as a pass checks" if self.search_plans_at_once is None else
                       f"up to {self.search_plans_at_once} a pass, more passes past that")
            lines.append(f"  search       : {fmt_bytes(self.search_state_bytes)} of hidden states per plan checked "
                         f"({at_once})")
        if self.selection_bytes:
            bound = (f", up to {fmt_bytes(self.selection_bound_bytes)} if the candidate plans remove different "
                     "runs") if self.selection_bound_bytes > self.selection_bytes else ""
            if self.selection_room_bytes is None:
                room = "no limit"
            elif self.selection_spills:
                room = f"in memory up to {fmt_bytes(self.selection_room_bytes)}, the rest on disk"
            else:
                room = (f"in memory up to {fmt_bytes(self.selection_room_bytes)}; past it the search stops: "
                        "offload_dir lets them spill")
            lines.append(f"  compensation : about {fmt_bytes(self.selection_bytes)} of d x d float64 matrices "
                         f"(host{bound}; {room})")
        if self.checkpoint_bytes:
            lines.append(f"  checkpoint   : {fmt_bytes(self.checkpoint_bytes)} on disk (every block's outputs)")
        lines.append(self._peak_line())
        return "\n".join(lines)

    def _peak_line(self) -> str:
        limit = "no limit" if self.limit_bytes is None else f"limit {fmt_bytes(self.limit_bytes)}"
        budget = f"({limit}; the least this run needs: {fmt_bytes(self.minimum_bytes)})"
        if self.on_cpu:
            return f"  predicted peak: {fmt_bytes(self.peak_host_bytes)} {budget}"
        return (f"  predicted peak: device {fmt_bytes(self.peak_device_bytes)} {budget}, host "
                f"{fmt_bytes(self.peak_host_bytes)}")


def project_tiers(total: int, budgets: dict[str, int]) -> dict[str, int]:
    """First-fit projection of ``total`` cache bytes over device -> cpu -> disk."""
    out, left = {}, total
    for tier in ("device", "cpu"):
        take = min(left, budgets.get(tier, 0))
        out[tier] = take
        left -= take
    out["disk"] = left
    return out


# --- sizes ---------------------------------------------------------------------------------------------------
def _config_int(config, *names: str, default: int = 0) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def hidden_size(config) -> int:
    """The residual stream's width (the names the supported families use)."""
    return _config_int(config, "hidden_size", "n_embd", "d_model")


def _head_dim(config) -> int:
    heads = _config_int(config, "num_attention_heads", "n_head", default=1)
    return _config_int(config, "head_dim", default=hidden_size(config) // heads)


def block_call_bytes(adapter, windows: int, seq_len: int, itemsize: int) -> int:
    """Transient memory of one block forward over ``windows`` x ``seq_len`` tokens.

    Per token: the MLP's gate/up/product (3 x intermediate) beside the input, residual, norm and output
    (4 x hidden); with eager attention also the scores and probabilities in fp32 (fused attention, sdpa's and
    flash, does not materialize them). Measured on the CPU (tests/test_memory_budget.py): within 20%.
    """
    cfg = adapter.config
    d = hidden_size(cfg)
    f = _config_int(cfg, "intermediate_size", "ffn_dim", "n_inner", default=4 * d)
    heads = _config_int(cfg, "num_attention_heads", "n_head", default=1)
    eager = getattr(cfg, "_attn_implementation", "eager") in (None, "eager")
    scores = 2 * windows * heads * seq_len * seq_len * 4 if eager else 0
    return windows * seq_len * (3 * f + 4 * d) * itemsize + scores


def head_call_bytes(adapter, tokens: int, itemsize: int, gradients: bool) -> int:
    """The head over one batch: the logits, their fp32 copy and log-softmax (and their gradient)."""
    vocab = _config_int(adapter.config, "vocab_size")
    return tokens * vocab * (itemsize + 4 * (3 if gradients else 2))


def _grad_record_bytes(adapter) -> int:
    """``losses.BlockGradStats.record``: float64 weight, gradient, product and its abs of the largest tensor."""
    largest = max((p.numel() for p in adapter.blocks.parameters()), default=0)
    return 4 * FLOAT64 * largest


@dataclass
class _Shape:
    """The calibration set's sizes the plan needs."""

    hidden: int
    itemsize: int
    tokens: int  # every batch, padded
    seq_len: int  # the longest window
    batch_tokens: int  # the largest batch
    call_windows: int  # windows in one block call
    kept_tokens: int  # tokens of the kept batches
    head_dim: int  # the rotary tables every batch's block calls keep (cos, sin: 2 x head_dim per token)

    def call_args(self, tokens: int) -> int:
        """The block-call arguments (rotary tables) ``tokens`` keep for the whole pass, in fp32."""
        return tokens * 2 * self.head_dim * 4

    @classmethod
    def of(cls, adapter, batches, act_dtype, windows_per_call: int, kept_batches: int) -> _Shape:
        shapes = [tuple(b["input_ids"].shape) for b in batches]
        windows = min(max(windows_per_call, max(s[0] for s in shapes)), sum(s[0] for s in shapes))
        return cls(hidden=hidden_size(adapter.config),
                   itemsize=torch.tensor([], dtype=act_dtype).element_size(),
                   tokens=sum(s[0] * s[1] for s in shapes), seq_len=max(s[1] for s in shapes),
                   batch_tokens=max(s[0] * s[1] for s in shapes), call_windows=windows,
                   kept_tokens=sum(s[0] * s[1] for s in shapes[:kept_batches]), head_dim=_head_dim(adapter.config))


@dataclass
class _Phase:
    """One phase of the run: what it holds that cannot spill (device side, host side) and its caches."""

    name: str
    weights: int  # weights in use on the device side (the CPU itself when computing there)
    work: int  # one call's transient bytes
    matrices: int = 0  # compensation's d x d float64 matrices (host) that cannot spill
    spillable: int = 0  # ... that go to disk past the room the budget leaves them (an offload folder given)
    solve: int = 0  # the solve's temporaries: a batch's XᵀX and XᵀY, an eigendecomposition and its products
    args: int = 0  # the batches' block-call arguments (rotary tables), kept for the whole pass
    caches: tuple[int, int] = (0, 0)  # (device, host) bytes of the caches this phase holds

    def fixed(self, host_weights: int) -> tuple[int, int]:
        return self.weights + self.work + self.solve + self.args, host_weights + self.matrices


@dataclass
class _Weights:
    """Weight bytes by where they sit: the device side while a block runs / while the embedding and head
    run, and the host (the model's CPU copy, or a lazy model's embedding/head)."""

    mode: str
    what: str
    block: int
    other: int
    device_block: int
    device_head: int
    host: int


def _weights_bytes(weights: BlockWeights, adapter, on_cpu: bool, prefetch: bool, gradients: bool) -> _Weights:
    n = adapter.num_blocks
    block = max(weights.block_bytes(i) for i in range(n))
    everything = module_bytes(adapter.model, weights.dtype)
    other = everything - sum(weights.block_bytes(i) for i in range(n))
    grads = block if gradients else 0
    if weights.mode == "resident":
        return _Weights(weights.mode, "the whole model" + (" + one block's gradients" if gradients else ""),
                        block, other, everything + grads, everything, 0)
    held = (2 if prefetch else 1) * block
    what = ("two blocks (prefetch)" if prefetch else "one block") + (" + its gradients" if gradients else "")
    # copy: the model stays where it is (the CPU) in its own dtype; lazy: only the embedding/head are loaded
    host = module_bytes(adapter.model) if weights.mode == "copy" else other
    if prefetch and weights.mode == "lazy" and not on_cpu:
        host += block  # the next block is read into pinned host memory before its copy to the GPU
    head = 0 if (on_cpu and weights.mode == "lazy") else other  # on the CPU a lazy model's head is in ``host``
    return _Weights(weights.mode, what, block, other, held + grads, head, host)


def preflight(adapter, batches, budget: Budget, *, gradients: bool, device=None, dtype=None, offload_dir=None,
              keep_inputs: int = 0, max_cpu_memory=None, prefetch: bool | None = None,
              windows_per_call: int | None = None) -> MemoryPlan:
    """The plan ``calibrate`` will make with these arguments (its own planning step, automatic speed-ups
    giving way to the budget the same way), made before anything runs.

    Why: a caller that runs other stages beside calibration (the CKA accumulator) sizes them from it, and a
    budget below the least the run needs fails here, before any work.
    """
    from .runtime import _first_device, _kept_batches, _plan, _validate_batches  # runtime imports this module

    batches = _validate_batches(batches, adapter)  # the errors calibrate would give, first
    device = _first_device(adapter) if device is None else resolve_device(device)
    act_dtype = dtype or next((p.dtype for p in adapter.blocks.parameters() if p.is_floating_point()), torch.float32)
    weights = BlockWeights(adapter, device, dtype, prefetch=prefetch)
    return _plan(adapter, weights, batches, gradients, act_dtype, device, budget, max_cpu_memory, offload_dir,
                 _kept_batches(batches, keep_inputs), prefetch, windows_per_call)[0]


# --- the plan ---------------------------------------------------------------------------------------------
def plan_memory(adapter, weights: BlockWeights, batches, gradients, act_dtype, device, max_device_memory,
                max_cpu_memory, offload_dir, kept_batches: int = 0, *, prefetch: bool | None = None,
                windows_per_call: int = 1) -> tuple[MemoryPlan, dict[str, int], str | None]:
    """The plan, the activation store's budgets and the checked offload folder; a ValueError when the budget
    is below the least the run needs (before any work).

    ``max_device_memory``: bytes, a size string, None, or a ``Budget`` (which also says what later stages
    hold). On the CPU it bounds the whole run's memory (the device is the host); ``max_cpu_memory`` bounds
    the activation cache's CPU tier. ``prefetch`` (None: the weights' own setting) holds a second block;
    ``windows_per_call`` windows go through a block in one call.
    """
    budget = max_device_memory if isinstance(max_device_memory, Budget) else Budget(max_device_memory)
    limit = parse_bytes(budget.limit, budget.name)
    cpu_limit = parse_bytes(max_cpu_memory, "max_cpu_memory")
    prefetch = bool(getattr(weights, "prefetch", False)) if prefetch is None else bool(prefetch)
    on_cpu = device.type == "cpu"
    shape = _Shape.of(adapter, batches, act_dtype, windows_per_call, kept_batches)
    slot = shape.tokens * shape.hidden * shape.itemsize
    grad = shape.tokens * shape.hidden * 4 if gradients else 0
    n_slots = adapter.num_blocks + 1 if gradients else 2
    if kept_batches and not gradients:  # every block's input stays cached for the kept batches (the verifier)
        n_slots += (adapter.num_blocks - 1) * shape.kept_tokens / max(shape.tokens, 1)
    cache_total = int(n_slots * slot) + grad
    w = _weights_bytes(weights, adapter, on_cpu, prefetch, gradients)
    # with an offload folder and a budget, compensation's matrices spill like a cache (selection/matrix_store.py)
    spill_matrices = bool(budget.host_matrices) and offload_dir is not None and limit is not None
    maps = lazy_weights.changes_at_load(adapter.model) if w.mode == "lazy" else 0
    if maps:  # the maps a lazy compensated model folds at each read stay on the host, d x d float64 each
        w = dataclasses.replace(w, host=w.host + maps * shape.hidden * shape.hidden * FLOAT64)
    phases = _phases(adapter, shape, w, gradients, budget, kept_batches > 0, spill_matrices, on_cpu,
                     folds_at_load=maps > 0)
    worst = max(phases, key=lambda ph: _cost(ph.fixed(w.host), on_cpu))
    least = _cost(worst.fixed(w.host), on_cpu)

    if not on_cpu and limit is None:
        free, _ = torch.cuda.mem_get_info(device) if device.type == "cuda" else (0, 0)
        limit = int(free * 0.9)  # no limit asked: what is free now (the device cannot give more)
    name = budget.name if budget.limit is not None else None
    # a cache that spills makes copies: a call's input read back from disk, its output on its way there, and
    # the previous call's pair until the next replaces them; on the CPU they count against the budget, so the
    # least (everything spilled) includes them
    copies = 4 * shape.call_windows * shape.seq_len * shape.hidden * shape.itemsize if cache_total else 0
    if on_cpu:
        least += copies
    if limit is not None and limit < least:
        raise BudgetTooSmall(_below_minimum(name, limit, least, worst, w, shape, device, copies if on_cpu else 0),
                             least, limit)
    room = None if limit is None else limit - least + (copies if on_cpu else 0)
    budgets = _cache_budgets(on_cpu, room, cpu_limit)
    tiers = project_tiers(cache_total, budgets)
    spill = copies if tiers["disk"] else 0
    if spill and on_cpu and room is not None:  # spilling after all: the copies take their share of the room
        room -= spill
        budgets = _cache_budgets(on_cpu, room, cpu_limit)
        tiers = project_tiers(cache_total, budgets)
    checked_dir = check_offload_dir(offload_dir, tiers["disk"])
    if tiers["disk"] > 0 and checked_dir is None:
        raise ValueError(
            f"offload_dir: the activation cache needs {fmt_bytes(cache_total)} but the memory "
            f"budget (max_device_memory / max_cpu_memory) leaves room for {fmt_bytes(sum(budgets.values()))}; pass "
            f"offload_dir=<a folder with {fmt_bytes(tiers['disk'])} free> to spill the rest to disk, raise the "
            "budget, or use fewer/shorter calibration windows"
        )
    cka_budget = None if room is None else max(0, room - tiers["cpu" if on_cpu else "device"])
    # on a GPU the activation cache's CPU tier and the CKA items' share one pinned pool (what max_cpu_memory,
    # default half the free RAM, allows): the items get what the activations leave of it
    cka_cpu_budget = None if on_cpu else max(0, budgets["cpu"] - tiers["cpu"])
    cka = _cka_tiers(budget.cka_item_bytes, cka_budget, device, cka_cpu_budget)
    kept = (adapter.num_blocks + 1) * shape.kept_tokens * shape.hidden * shape.itemsize
    _place_caches(phases, tiers, cka, kept, spill)
    per_plan, at_once = _search_states(phases, shape, budget, w, on_cpu, limit, kept_batches)
    matrices_room = _matrices_room(phases, w.host, on_cpu, limit,
                                   host_pool=budgets["cpu"] if spill_matrices and not on_cpu else None)
    if spill_matrices:  # in memory up to the room, which the peak counts; the rest on disk
        for ph in phases:
            if ph.spillable:
                ph.caches = (ph.caches[0], ph.caches[1] + min(ph.spillable, matrices_room))
    peak_dev, peak_host = _peaks(phases, w.host, on_cpu)
    plan = MemoryPlan(
        device=str(device), weights_mode=weights.describe(), max_block_bytes=w.block, other_weight_bytes=w.other,
        activation_slot_bytes=slot, num_slots=n_slots, grad_bytes=grad, tiers=tiers,
        budgets={"device": budgets["device"], "cpu": budgets["cpu"], "disk": None if checked_dir else 0},
        working_set_bytes=max(ph.work for ph in phases), cka_item_bytes=budget.cka_item_bytes,
        cka_budget=cka_budget, cka_cpu_budget=cka_cpu_budget, cka_tiers=cka, selection_bytes=budget.host_matrices * shape.hidden ** 2 * FLOAT64,
        selection_bound_bytes=budget.host_matrices_bound * shape.hidden ** 2 * FLOAT64,
        selection_room_bytes=matrices_room if budget.host_matrices else None, selection_spills=spill_matrices,
        search_state_bytes=per_plan, search_plans_at_once=at_once,
        peak_device_bytes=peak_dev, peak_host_bytes=peak_host, minimum_bytes=least, limit_bytes=limit,
    )
    return plan, budgets, checked_dir


def _search_states(phases: list[_Phase], shape: _Shape, budget: Budget, w: _Weights, on_cpu: bool,
                   limit: int | None, kept_batches: int) -> tuple[int, int | None]:
    """(bytes of hidden states one plan holds during a search pass, plans a pass may check together).

    Why: a pass of the verified search runs every plan it checks through each block at once (each block read
    once), holding each plan's hidden state of every kept window and, while a block runs, its output: 2 x
    kept tokens x hidden per plan (8 GiB at 70B with 128 x 2048 kept tokens, bf16). The least counts one
    plan (``_phases``); under a limit the plans that fit beside everything else the selection phase holds go
    together and the search makes more passes past that; without one, ``Budget.search_plans`` (what a pass
    typically checks) is the prediction. Adds what it allows to the selection phase."""
    if not (budget.search_plans and kept_batches):
        return 0, None
    sel = next(ph for ph in phases if ph.name == "selection")
    per_plan = _search_state_bytes(shape, budget)
    extra = budget.search_plans - 1
    at_once = None
    if limit is not None:
        # before compensation's spillable matrices: those go to disk past what is left (their room is made after)
        held = _cost(sel.fixed(w.host), on_cpu) + (sum(sel.caches) if on_cpu else sel.caches[0])
        fit = max(0, limit - held) // per_plan if per_plan else extra
        at_once = 1 + fit  # a larger call (the greedy's shortlist, the map trials) may use all the room
        extra = min(extra, fit)
    sel.work += extra * per_plan
    return per_plan, at_once


def _search_state_bytes(shape: _Shape, budget: Budget) -> int:
    """One checked plan's hidden states and a block's output: 2 x the check windows' tokens x hidden (the
    check runs on the leading kept batches holding them: up to a batch more)."""
    tokens = shape.kept_tokens
    if budget.search_windows:
        tokens = min(tokens, budget.search_windows * shape.seq_len + shape.batch_tokens - shape.seq_len)
    return 2 * tokens * shape.hidden * shape.itemsize


def _matrices_room(phases: list[_Phase], host_weights: int, on_cpu: bool, limit: int | None,
                   host_pool: int | None = None) -> int | None:
    """What the budget leaves compensation's matrices in memory (None: no limit): the limit less everything
    else the selection or the solve phase holds, whichever holds more. On a GPU the matrices are host
    memory, which max_memory does not bound: with an offload folder (``host_pool``) they take what the kept
    inputs leave of the host pool the caches share (max_cpu_memory, default half the free RAM), the rest on
    disk (at 70B a run's statistics and maps are 7.5 GiB; several candidates' runs outgrow the host)."""
    if host_pool is not None and not on_cpu:
        rooms = [host_pool - ph.caches[1] for ph in phases if ph.name in ("selection", "solve")]
        return max(0, min(rooms)) if rooms else None
    if limit is None or not on_cpu:
        return None
    rooms = [limit - (sum(ph.fixed(host_weights)) - ph.matrices) - sum(ph.caches)
             for ph in phases if ph.name in ("selection", "solve")]
    return max(0, min(rooms)) if rooms else None


def _cache_budgets(on_cpu: bool, room: int | None, cpu_limit: int | None) -> dict[str, int]:
    """The activation store's budgets: on the CPU the room the budget leaves (and max_cpu_memory), on a GPU
    the device's room and max_cpu_memory; unbounded ones take half the free RAM."""
    if on_cpu:
        given = [b for b in (room, cpu_limit) if b is not None]
        return {"device": 0, "cpu": min(given) if given else free_memory_bytes("cpu") // 2}
    return {"device": room, "cpu": cpu_limit if cpu_limit is not None else free_memory_bytes("cpu") // 2}


def _cost(fixed: tuple[int, int], on_cpu: bool) -> int:
    """What a phase asks of the budget: the device's bytes, or on the CPU everything (the device is the host)."""
    return fixed[0] + fixed[1] if on_cpu else fixed[0]


def _phases(adapter, shape: _Shape, w: _Weights, gradients: bool, budget: Budget, kept: bool,
            spill_matrices: bool = False, on_cpu: bool = True, folds_at_load: bool = False) -> list[_Phase]:
    """Calibration's forward, head and backward, and the selection that re-runs blocks from the kept inputs.
    ``folds_at_load``: a lazy model folds a compensation map into a block each time it is read (a pruned,
    compensated model evaluated streamed): the read block, the weight's folded copy, the fold's slices
    and, on a GPU, the map in float64, before the block runs and before the next block is prefetched."""
    host_matrices = budget.host_matrices
    # a block call, or after it the observers (the CKA panel of a completing batch): not both at once
    call = block_call_bytes(adapter, shape.call_windows, shape.seq_len, shape.itemsize)
    forward = max(call, budget.cka_work_bytes)
    args = shape.call_args(shape.tokens)
    out = [_Phase("forward", w.device_block, forward, args=args),
           _Phase("head", w.device_head, head_call_bytes(adapter, shape.batch_tokens, shape.itemsize, gradients),
                  args=args)]
    if gradients:  # the autograd graph of one batch and its fp32 gradients, or the float64 statistics after
        one = block_call_bytes(adapter, 1, shape.seq_len, shape.itemsize) * shape.batch_tokens // shape.seq_len
        work = max(2 * one + 2 * shape.batch_tokens * shape.hidden * 4, _grad_record_bytes(adapter))
        out.append(_Phase("backward", w.device_block, work, args=args))
    if folds_at_load:
        d2 = shape.hidden * shape.hidden * FLOAT64
        fold = _folded_copy_bytes(adapter.config, shape) + _fold_bytes(adapter.config, shape) + (0 if on_cpu else d2)
        out.append(_Phase("fold at load", w.block, fold, args=args))
    if kept or host_matrices:
        check = block_call_bytes(adapter, 1, shape.seq_len, shape.itemsize) * shape.batch_tokens // shape.seq_len
        d2 = shape.hidden * shape.hidden * FLOAT64
        held = host_matrices * d2

        def matrices(n: int) -> dict:
            return dict(matrices=0 if spill_matrices else n, spillable=n if spill_matrices else 0)
        solve = 0
        if host_matrices:
            # the check pass and the statistics pass: a block call and one batch's XᵀX and XᵀY, or a map
            # being folded into the block's MLP output weight; while a block runs with a map its folded weight
            # is held beside the original (and, on a GPU, the map on the device)
            check = max(check + 2 * d2, _fold_bytes(adapter.config, shape)) + _folded_copy_bytes(adapter.config, shape)
            solve = 0 if on_cpu else d2
        # the search's pass holds one plan's hidden states at least (``_search_states`` adds the others)
        if budget.search_plans:
            check += _search_state_bytes(shape, budget)
        out.append(_Phase("selection", w.device_block, check, solve=solve, args=shape.call_args(shape.kept_tokens),
                          **matrices(held)))
        if host_matrices:  # the maps' solves, between the passes: no block, the solve's temporaries, and the
            # run's fold decompositions its held-out maps are fitted from (released before the next pass)
            out.append(_Phase("solve", w.device_head if w.mode == "resident" else 0, 0,
                              solve=SOLVE_MATRICES * d2, **matrices(held + budget.solve_matrices * d2)))
    return out


def _mlp_output_elems(config) -> int:
    """Elements of one block's MLP output projection (hidden x intermediate)."""
    d = hidden_size(config)
    return d * _config_int(config, "intermediate_size", "ffn_dim", "n_inner", default=4 * d)


def _folded_copy_bytes(config, shape: _Shape) -> int:
    """The MLP output weight's folded copy, held beside the original while a map is folded in."""
    return _mlp_output_elems(config) * shape.itemsize


def _fold_bytes(config, shape: _Shape) -> int:
    """Folding a map into the MLP output weight, a slice at a time: the slice in float64 and its product
    (the product's cast back is made once the float64 slice is freed, and is smaller than it)."""
    return 2 * min(FOLD_SLICE_BYTES, _mlp_output_elems(config) * FLOAT64)


def _place_caches(phases: list[_Phase], tiers: dict[str, int], cka: dict[str, int], kept: int,
                  spill: int) -> None:
    """The caches each phase holds: the activation cache (and the CKA items while the forward runs), then
    only the kept block inputs, wherever first fit put them. ``spill``: with a disk tier, the copies of the
    activations read back and written out (on the CPU)."""
    for ph in phases:
        if ph.name in ("selection", "solve"):
            on_dev = min(kept, tiers["device"])
            ph.caches = (on_dev, min(kept - on_dev, tiers["cpu"]) + spill)
        elif ph.name == "forward":
            ph.caches = (tiers["device"] + cka["device"], tiers["cpu"] + cka["cpu"] + spill)
        else:
            ph.caches = (tiers["device"], tiers["cpu"] + spill)


def _peaks(phases: list[_Phase], host_weights: int, on_cpu: bool) -> tuple[int, int]:
    """The largest phase on each side: (device bytes, host bytes); on the CPU both are the one sum."""
    sides = [tuple(f + c for f, c in zip(ph.fixed(host_weights), ph.caches)) for ph in phases]
    if on_cpu:
        both = max(d + h for d, h in sides)
        return both, both
    return max(d for d, _ in sides), max(h for _, h in sides)


def _below_minimum(name: str | None, limit: int, least: int, worst: _Phase, w: _Weights, shape: _Shape,
                   device, spill: int = 0) -> str:
    """One line: the budget (``name``; None: a GPU's free memory), what the run cannot do without, the fix."""
    on_cpu = device.type == "cpu"
    if w.mode == "resident":
        held = "the whole model" + (" + one block's gradients" if worst.weights > w.device_head else "")
    else:
        held = "the embedding/head" if worst.name == "head" else w.what
        if on_cpu and w.mode == "copy":
            held += " + the model's CPU copy"
        elif on_cpu and worst.name != "head":
            held += " + the embedding/head"
    calls = shape.call_windows if worst.name == "forward" else 1
    work = ("a compensation map folded into the block's MLP output weight as it is read (its folded copy and "
            "the fold's slices)" if worst.name == "fold at load" else
            f"one {worst.name if worst.name != 'selection' else 'check'} call's working set ({calls} window(s) x "
            f"{shape.seq_len} tokens)")
    parts = [(f"weights ({held})", worst.weights + (w.host if on_cpu else 0)),
             (work, worst.work),
             ("the batches' block-call arguments", worst.args),
             ("compensation's d x d float64 matrices", worst.matrices + worst.solve),
             ("activations copied from and to disk (two calls' inputs and outputs)", spill)]
    parts = [(what, n) for what, n in parts if n]
    biggest = max(parts, key=lambda p: p[1])[0]
    if biggest.startswith("weights") and w.mode == "resident":
        fix = "or load the model with lazy=True (one block at a time)"
    elif biggest.startswith("weights"):
        fix = f"or use a device with more memory: {held} must fit at once"
    elif biggest.startswith("a compensation map"):
        fix = "or evaluate the saved model (its weights have the maps folded in)"
    elif biggest.startswith("compensation"):
        fix = "or use compensate=False"
    else:
        fix = "or lower seq_len"
    where = "CPU (the device is the host)" if on_cpu else str(device)
    listed = " + ".join(f"{what} {fmt_bytes(n)}" for what, n in parts)
    head = f"{name}: {fmt_bytes(limit)} is" if name else f"{device} has {fmt_bytes(limit)} free, which is"
    raise_it = f"raise {name} to" if name else "free memory there, or pass max_device_memory with"
    return (f"{head} below the least this run needs on the {where}: {listed} = {fmt_bytes(least)} (the "
            f"activation cache can spill to offload_dir, these cannot); {raise_it} at least {fmt_bytes(least, round_up=True)}, "
            f"{fix}")


def _cka_tiers(total: int, budget: int | None, device: torch.device, cpu_budget: int | None = None) -> dict[str, int]:
    """Where the CKA items go: memory up to ``budget`` (None: the accumulator's default, half the free
    memory; on a GPU then pinned CPU memory up to ``cpu_budget``, None: half the free RAM), the rest to disk."""
    if not total:
        return {"device": 0, "cpu": 0, "disk": 0}
    take = min(total, budget if budget is not None else free_memory_bytes(device) // 2)
    rest = total - take
    if device.type == "cpu":
        return {"device": 0, "cpu": take, "disk": rest}
    spill = min(rest, cpu_budget if cpu_budget is not None else free_memory_bytes("cpu") // 2)
    return {"device": take, "cpu": spill, "disk": rest - spill}
