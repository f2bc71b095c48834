"""Stage 5, the plan: how many blocks go (the budget), which went and how they were chosen, as versioned JSON.

Budget (``resolve_budget``): ``remove=N`` blocks, or ``ratio=r`` of the blocks (N = floor(r*L + 1/2)), or
``ratio=r, ratio_of="params"``: N = floor(r*P_total / P_block + 1/2), P_total = all model parameters, P_block
= mean parameters of a block. The split over segments and the protection rules are the selection stage's
frame (``selection/frame.py``); the selectors are in ``selection/registry.py``. A ranking's plan records the
per-segment counts of the split; a search's plan (``"verified"``, the default) records in ``selection`` every
candidate and how the pick was made, and in ``compensation`` the folded maps (``compensation.safetensors``).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from safetensors.torch import load_file, save_file

from . import __version__
from .checks import check_int
from .models import get_adapter
from .models.base import config_fingerprint  # noqa: F401  (part of the plan's API)
from .selection.frame import check_segments
from .selection.registry import SELECTORS, Evidence, Frame, get_selector

SCHEMA_VERSION = 1
PLAN_FORMAT = "sglp-plan"
COMPENSATION_FILE = "compensation.safetensors"

# ---------------------------------------------------------------------------------------------- budget
def check_ratio(ratio: Any) -> float:
    """A fraction to remove: a number in [0, 1)."""
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio: expected a number in [0, 1), got {ratio!r}")
    return float(ratio)


def resolve_budget(num_blocks: int, *, remove: int | None = None, ratio: float | None = None,
                   ratio_of: str = "blocks", total_params: int | None = None,
                   block_params: Sequence[int] | None = None) -> int:
    """Number of blocks to remove from ``remove`` or ``ratio`` (exactly one of them)."""
    if (remove is None) == (ratio is None):
        raise ValueError(f"budget: give exactly one of remove (blocks) or ratio, got remove={remove!r}, "
                         f"ratio={ratio!r}")
    if remove is not None:
        return check_int("remove", remove, 0, num_blocks - 1, expected=f"an int in [0, {num_blocks - 1}] (the "
                         f"model has {num_blocks} blocks and keeps at least one)")
    check_ratio(ratio)
    if ratio_of == "blocks":
        n = math.floor(ratio * num_blocks + 0.5)
    elif ratio_of == "params":
        if not total_params or not block_params:
            raise ValueError("ratio_of='params' needs total_params and block_params (the model's parameter "
                             "counts); pass the model, not only its block count")
        mean_block = sum(block_params) / len(block_params)
        n = math.floor(ratio * total_params / mean_block + 0.5)
    else:
        raise ValueError(f"ratio_of: expected 'blocks' or 'params', got {ratio_of!r}")
    if n >= num_blocks:
        raise ValueError(f"ratio: {ratio} of the {ratio_of} means removing {n} of {num_blocks} blocks, but at "
                         "least one block must stay; use a smaller ratio")
    return n


# ------------------------------------------------------------------------------------------------ plan
_REQUIRED = {"format": str, "schema_version": int, "package_version": str, "model": dict, "calibration": dict,
             "cka": list, "segments": list, "k": int, "k_rule": str, "scorer": str, "scores": dict}


class Plan:
    """The versioned JSON document of one SGLP analysis (+ the removed blocks when a budget was given)."""

    def __init__(self, *, model: Mapping[str, Any], calibration: Mapping[str, Any], cka: Any,
                 segments: Sequence[Sequence[int]], k: int, k_rule: str, scorer: str,
                 scores: Mapping[str, Sequence[float]], removed: Sequence[int] | None = None,
                 budget: Mapping[str, Any] | None = None, package_version: str | None = None,
                 extra: Mapping[str, Any] | None = None, transforms: Mapping[int, Any] | None = None) -> None:
        if package_version is None:
            package_version = __version__
        self.package_version = package_version
        self.model = dict(model)
        self.calibration = dict(calibration)
        self.cka = np.asarray(cka, dtype=np.float64)
        self.segments = [tuple(int(x) for x in s) for s in segments]
        self.k = k
        self.k_rule = k_rule
        self.scorer = scorer
        self.scores = {name: [float(x) for x in v] for name, v in scores.items()}
        self.removed = None if removed is None else [int(i) for i in removed]
        self.budget = None if budget is None else dict(budget)
        self.extra = dict(extra or {})
        # compensation maps {block before a removed run: T [d, d]} (compensate.py); saved next to the JSON
        self.transforms = None if transforms is None else {int(k): v for k, v in transforms.items()}
        self.validate()

    @property
    def num_blocks(self) -> int:
        return int(self.model["num_blocks"])

    @property
    def kept(self) -> list[int]:
        removed = set(self.removed or ())
        return [i for i in range(self.num_blocks) if i not in removed]

    def removed_per_segment(self) -> list[list[int]]:
        removed = set(self.removed or ())
        return [[i for i in range(a, b + 1) if i in removed] for a, b in self.segments]

    # -- validation ---------------------------------------------------------------------------------
    def validate(self) -> None:
        """Internal consistency; raises ValueError naming the offending key."""
        m = self.model
        for key in ("id", "num_blocks", "config_hash"):
            if key not in m:
                raise ValueError(f"plan: 'model' lacks {key!r}; the plan is corrupted or from another tool")
        L = m["num_blocks"]
        if not isinstance(L, int) or L < 1:
            raise ValueError(f"plan: model.num_blocks must be a positive int, got {L!r}")
        if self.cka.shape != (L, L) or not np.all(np.isfinite(self.cka)):
            raise ValueError(f"plan: 'cka' must be a finite {L}x{L} matrix (num_blocks={L}), got shape "
                             f"{self.cka.shape}")
        check_segments(self.segments, L)
        if self.k != len(self.segments):
            raise ValueError(f"plan: k={self.k} but there are {len(self.segments)} segments")
        for name, values in self.scores.items():
            if len(values) != L or not all(math.isfinite(v) for v in values):
                raise ValueError(f"plan: scores[{name!r}] must hold {L} finite numbers, got {len(values)}")
        selector = SELECTORS.get(self.scorer)
        ranked_by = selector.score if selector is not None else self.scorer
        if ranked_by not in self.scores:
            raise ValueError(f"plan: scorer {self.scorer!r} needs the scores {ranked_by!r}, which 'scores' lacks "
                             f"({sorted(self.scores)})")
        if selector is not None and selector.kind == "search" and self.removed is not None \
                and "selection" not in self.extra:
            raise ValueError(f"plan: scorer {self.scorer!r} removed blocks but the plan has no 'selection' "
                             "record of how they were chosen")
        if self.removed is not None:
            r = self.removed
            if r != sorted(set(r)) or (r and (r[0] < 0 or r[-1] >= L)) or len(r) >= L:
                raise ValueError(f"plan: 'removed' must be sorted unique block indices in [0, {L - 1}] leaving "
                                 f"at least one block, got {r}")
            if self.budget is None:
                raise ValueError("plan: 'removed' is given without its 'budget'")
        comp = self.extra.get("compensation")
        if comp is not None:
            if self.removed is None or not isinstance(comp, Mapping) or not isinstance(comp.get("blocks"), list):
                raise ValueError("plan: 'compensation' must be {'blocks': [...], ...} on a plan that removes blocks")
            starts = {i + 1 for i in comp["blocks"]}
            if any(not isinstance(i, int) or i in self.removed or i + 1 not in self.removed for i in comp["blocks"]) \
                    or not starts <= set(self.removed):
                raise ValueError(f"plan: compensation blocks {comp['blocks']} must each be a kept block right before "
                                 f"a removed run (removed: {self.removed})")
            if self.transforms is not None:
                _check_transforms(self.transforms)
            if self.transforms is not None and sorted(self.transforms) != sorted(comp["blocks"]):
                raise ValueError(f"plan: compensation maps for blocks {sorted(self.transforms)}, the plan lists "
                                 f"{comp['blocks']}; the compensation file belongs to another plan: keep the "
                                 "plan's own file next to it, or re-plan")

    def check_model(self, model: Any) -> None:
        """Refuse to apply this plan to a model it was not made for (block count or config differ)."""
        n = get_adapter(model).num_blocks
        if n != self.num_blocks:
            raise ValueError(f"plan: made for a model with {self.num_blocks} blocks ({self.model['id']}), but "
                             f"this model has {n} (already pruned, or another model?); apply it to the "
                             "original model")
        fp = config_fingerprint(model.config)
        if fp != self.model["config_hash"]:
            raise ValueError(f"plan: config hash mismatch: the plan is for {self.model['id']} "
                             f"({self.model['config_hash'][:19]}...), this model's config hashes to "
                             f"{fp[:19]}...; apply the plan to the model it was made for")

    # -- (de)serialization ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "format": PLAN_FORMAT, "schema_version": SCHEMA_VERSION, "package_version": self.package_version,
            "model": self.model, "calibration": self.calibration, "cka": self.cka.tolist(),
            "segments": [list(s) for s in self.segments], "k": self.k, "k_rule": self.k_rule,
            "scorer": self.scorer, "scores": self.scores,
        }
        if self.removed is not None:
            d["removed"] = list(self.removed)
            d["budget"] = self.budget
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        if not isinstance(d, Mapping):
            raise ValueError(f"plan: expected a JSON object, got {type(d).__name__}")
        if d.get("format") != PLAN_FORMAT:
            raise ValueError(f"plan: 'format' is {d.get('format')!r}, expected {PLAN_FORMAT!r}; not an SGLP plan")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"plan: schema_version {d.get('schema_version')!r} is not supported (this is "
                             f"sglp-fast with schema {SCHEMA_VERSION}); re-run `sglp analyze`/`sglp prune`")
        for key, typ in _REQUIRED.items():
            if key not in d:
                raise ValueError(f"plan: missing key {key!r}; the file is corrupted or truncated")
            if not isinstance(d[key], typ) or (typ is int and isinstance(d[key], bool)):
                raise ValueError(f"plan: {key!r} must be {typ.__name__}, got {type(d[key]).__name__}")
        if ("removed" in d) != ("budget" in d):
            raise ValueError("plan: 'removed' and 'budget' must appear together")
        known = set(_REQUIRED) | {"removed", "budget"}
        try:
            return cls(model=d["model"], calibration=d["calibration"], cka=d["cka"], segments=d["segments"],
                       k=d["k"], k_rule=d["k_rule"], scorer=d["scorer"], scores=d["scores"],
                       removed=d.get("removed"), budget=d.get("budget"), package_version=d["package_version"],
                       extra={k: v for k, v in d.items() if k not in known})
        except (TypeError, ValueError) as e:
            if str(e).startswith("plan:"):
                raise
            raise ValueError(f"plan: malformed content ({e}); the file is corrupted") from e

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | os.PathLike) -> None:
        """The JSON, and with compensation its maps in ``compensation.safetensors`` beside it."""
        if self.extra.get("compensation") is not None:
            if self.transforms is None:
                raise ValueError("plan: has compensation but no maps to save (loaded without its "
                                 "compensation.safetensors?)")
            target = os.path.join(os.path.dirname(os.path.abspath(os.fspath(path))), COMPENSATION_FILE)
            save_file({f"block.{k}": v.float().contiguous() for k, v in self.transforms.items()}, f"{target}.tmp")
            os.replace(f"{target}.tmp", target)
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self.to_json())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "plan.json")
        if not os.path.isfile(path):
            raise ValueError(f"plan: no such file {path!r}; pass the plan.json written by `sglp prune`/`analyze`")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"plan: {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at position "
                             f"{e.start}); pass the plan.json that sglp wrote") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"plan: {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                             "the file is corrupted or truncated") from None
        plan = cls.from_dict(d)
        if plan.extra.get("compensation") is not None:
            side = os.path.join(os.path.dirname(os.path.abspath(path)), COMPENSATION_FILE)
            if not os.path.isfile(side):
                raise ValueError(f"plan: {path} compensates removed blocks but {side} is missing; keep the file "
                                 "next to plan.json, or re-plan with --no-compensate")
            plan.transforms = _load_transforms(side)
            plan.validate()
        return plan


def _load_transforms(path: str) -> dict[int, Any]:
    """The compensation maps of ``compensation.safetensors``, refused when unreadable."""
    try:
        maps = load_file(path)
        return {int(k.split(".", 1)[1]): v.double() for k, v in maps.items()}
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise ValueError(f"plan: {path} is not a readable compensation file ({type(e).__name__}: {e}); it is "
                         "truncated or corrupted: re-plan, or re-plan with --no-compensate") from None


def _check_transforms(transforms: Mapping[int, Any]) -> None:
    """Each map is a finite square [d, d] matrix, all of one d (a NaN map would silently ruin the model)."""
    sizes = set()
    for block, T in transforms.items():
        shape = tuple(getattr(T, "shape", ()))
        if len(shape) != 2 or shape[0] != shape[1]:
            raise ValueError(f"plan: the compensation map of block {block} has shape {shape}, expected a square "
                             "[hidden, hidden] matrix; the compensation file is corrupted: re-plan")
        if not bool(np.isfinite(np.asarray(T, dtype=np.float64)).all()):
            raise ValueError(f"plan: the compensation map of block {block} holds NaN or inf; the compensation file "
                             "is corrupted: re-plan, or re-plan with --no-compensate")
        sizes.add(shape[0])
    if len(sizes) > 1:
        raise ValueError(f"plan: compensation maps of different sizes {sorted(sizes)}; the file is corrupted: re-plan")


def build_plan(*, model_info: Mapping[str, Any], calibration: Mapping[str, Any], cka: Any,
               segments: Sequence[Sequence[int]], k: int, k_rule: str, scorer: str,
               scores: Mapping[str, Sequence[float]], remove: int | None, budget_info: Mapping[str, Any] | None = None,
               protect_first: int = 0, protect_last: int = 0, allow_empty_segments: bool = False,
               extra: Mapping[str, Any] | None = None, selection: Mapping[str, Any] | None = None,
               transforms: Mapping[int, Any] | None = None,
               compensation: Mapping[str, Any] | None = None) -> Plan:
    """Apply the budget rules above and assemble the plan (``remove=None``: analysis only, nothing removed).

    For a search scorer (``"verified"``) pass its result as ``selection`` ({"removed": [...], ...}), and
    with compensation its maps (``transforms``) and their description (``compensation``).
    """
    L = int(model_info["num_blocks"])
    selector = get_selector(scorer)
    if selector.score not in scores:
        raise ValueError(f"scorer: {scorer!r} has no scores (computed: {sorted(scores)}); gradient scorers "
                         "need calibration with gradients: analyze(..., gradients=True)")
    removed = budget = None
    extra = dict(extra or {})
    if remove is not None:
        frame = Frame(segments, L, protect_first, protect_last, allow_empty_segments)
        per_segment = frame.per_segment(remove)
        if selector.kind == "search":
            if selection is None or len(selection.get("removed", ())) != remove:
                raise ValueError(f"scorer {scorer!r}: needs its search result for {remove} blocks (selection=...); "
                                 "use Analysis.plan_for, which runs the search")
            removed = sorted(int(i) for i in selection["removed"])
            per_segment = [sum(1 for i in removed if a <= i <= b) for a, b in check_segments(segments, L)]
            extra["selection"] = {k: v for k, v in selection.items() if k != "removed"}
        else:
            removed = selector.select(remove, frame, Evidence(scores=scores)).removed
        budget = {"remove": remove, **dict(budget_info or {}), "protect_first": protect_first,
                  "protect_last": protect_last, "allow_empty_segments": allow_empty_segments,
                  "per_segment": per_segment}
    if transforms:
        extra["compensation"] = {**dict(compensation or {}), "blocks": sorted(int(i) for i in transforms),
                                 "file": COMPENSATION_FILE}
    return Plan(model=model_info, calibration=calibration, cka=cka, segments=segments, k=k, k_rule=k_rule,
                scorer=scorer, scores=scores, removed=removed, budget=budget, extra=extra,
                transforms=transforms or None)
