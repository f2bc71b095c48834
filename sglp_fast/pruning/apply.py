"""Apply a plan to a model in memory: fold the compensation maps, then remove the planned blocks."""
from __future__ import annotations

from typing import Any

from ..models import get_adapter
from ..plan import Plan
from ..selection.compensation import apply_transforms


def apply_plan(model: Any, plan: Plan, check: bool = True) -> Any:
    """Remove ``plan.removed`` from ``model`` in place (after checking the plan was made for it)."""
    if plan.removed is None:
        raise ValueError("plan: has no 'removed' blocks (an analysis without a budget); re-run `sglp analyze` "
                         "or `sglp prune` with --remove/--ratio")
    if check:
        plan.check_model(model)
    if plan.extra.get("compensation") is not None and plan.transforms is None:
        raise ValueError("plan: compensates removed blocks but carries no maps; load it with Plan.load from "
                         "the folder holding compensation.safetensors")
    return remove_blocks(model, plan.removed, plan.transforms)


def remove_blocks(model: Any, removed: Any, transforms: Any = None) -> Any:
    """Fold compensation maps (if any) into the kept blocks, then drop ``removed``, in place; no plan checks."""
    adapter = get_adapter(model)
    if transforms:
        apply_transforms(adapter, transforms)  # indices are the original ones: fold before the removal
    adapter.remove_blocks(list(removed))
    return model
