"""The memory plan printed before calibration: what goes where, in bytes, and the tiers' projected use."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..sizes import fmt_bytes, parse_bytes
from .store import check_offload_dir, free_memory_bytes
from .weights import BlockWeights, module_bytes


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

    def __str__(self) -> str:
        lines = [
            f"memory plan (compute device: {self.device})",
            f"  weights      : {self.weights_mode}",
            f"    largest block       {fmt_bytes(self.max_block_bytes):>12}",
            f"    embedding/head/norm {fmt_bytes(self.other_weight_bytes):>12}",
            f"  activations  : {self.num_slots} slot(s) x {fmt_bytes(self.activation_slot_bytes)}"
            f" + gradients {fmt_bytes(self.grad_bytes)}",
        ]
        for tier in ("device", "cpu", "disk"):
            if tier == "device" and self.device == "cpu":
                continue  # computing on the CPU: the CPU tier is the device
            budget = self.budgets.get(tier)
            b = "unbounded" if budget is None else fmt_bytes(budget)
            lines.append(f"    {tier:<6} {fmt_bytes(self.tiers.get(tier, 0)):>12}  (budget {b})")
        if self.checkpoint_bytes:
            lines.append(f"  checkpoint   : {fmt_bytes(self.checkpoint_bytes)} on disk (every block's outputs)")
        return "\n".join(lines)


def project_tiers(total: int, budgets: dict[str, int]) -> dict[str, int]:
    """First-fit projection of ``total`` cache bytes over device -> cpu -> disk."""
    out, left = {}, total
    for tier in ("device", "cpu"):
        take = min(left, budgets.get(tier, 0))
        out[tier] = take
        left -= take
    out["disk"] = left
    return out


def plan_memory(adapter, weights: BlockWeights, batches, gradients, act_dtype, device, max_device_memory, max_cpu_memory,
          offload_dir, kept_batches: int = 0) -> tuple[MemoryPlan, dict[str, int], str | None]:
    hidden = int(getattr(adapter.config, "hidden_size", 0) or getattr(adapter.config, "n_embd", 0) or 0)
    itemsize = torch.tensor([], dtype=act_dtype).element_size()
    tokens_padded = sum(b["input_ids"].numel() for b in batches)
    slot = tokens_padded * hidden * itemsize
    grad = tokens_padded * hidden * 4 if gradients else 0
    n_slots = adapter.num_blocks + 1 if gradients else 2
    if kept_batches and not gradients:  # every block's input stays cached for the kept batches (the verifier)
        kept_tokens = sum(b["input_ids"].numel() for b in batches[:kept_batches])
        n_slots += (adapter.num_blocks - 1) * kept_tokens / max(tokens_padded, 1)
    block_bytes = max(weights.block_bytes(i) for i in range(adapter.num_blocks))
    all_bytes = module_bytes(adapter.model, weights.dtype)
    blocks_total = sum(weights.block_bytes(i) for i in range(adapter.num_blocks))
    dev_budget = parse_bytes(max_device_memory, "max_device_memory")
    cpu_budget = parse_bytes(max_cpu_memory, "max_cpu_memory")
    if device.type == "cpu":
        given = [b for b in (dev_budget, cpu_budget) if b is not None]
        cache_cpu = min(given) if given else free_memory_bytes("cpu") // 2
        cache_dev = 0
    else:
        if dev_budget is None:
            free, _ = torch.cuda.mem_get_info(device) if device.type == "cuda" else (0, 0)
            dev_budget = int(free * 0.9)
        resident = all_bytes if weights.mode == "resident" else block_bytes * 2  # weights + their gradients
        if dev_budget < resident:
            raise ValueError(
                f"max_device_memory: {dev_budget} bytes cannot hold {'the model' if weights.mode == 'resident' else 'one block'} "
                f"({resident} bytes with gradients); raise it, or load the model to CPU / lazily to stream blocks"
            )
        cache_dev = max(0, dev_budget - resident - 4 * (slot // max(len(batches), 1)))
        cache_cpu = cpu_budget if cpu_budget is not None else free_memory_bytes("cpu") // 2
    budgets = {"device": cache_dev, "cpu": cache_cpu}
    tiers = project_tiers(int(n_slots * slot) + grad, budgets)
    checked_dir = check_offload_dir(offload_dir, tiers["disk"])
    if tiers["disk"] > 0 and checked_dir is None:
        raise ValueError(
            f"offload_dir: the activation cache needs {fmt_bytes(int(n_slots * slot) + grad)} but the memory "
            f"budget (max_device_memory / max_cpu_memory) leaves room for {fmt_bytes(cache_dev + cache_cpu)}; pass "
            f"offload_dir=<a folder with {fmt_bytes(tiers['disk'])} free> to spill the rest to disk, raise the "
            "budget, or use fewer/shorter calibration windows"
        )
    plan = MemoryPlan(
        device=str(device), weights_mode=weights.describe(), max_block_bytes=block_bytes,
        other_weight_bytes=all_bytes - blocks_total, activation_slot_bytes=slot, num_slots=n_slots,
        grad_bytes=grad, tiers=tiers,
        budgets={"device": cache_dev if device.type != "cpu" else 0, "cpu": cache_cpu, "disk": None if checked_dir else 0},
    )
    return plan, budgets, checked_dir
