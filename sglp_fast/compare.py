"""SGLP against the baselines: same calibration, same budgets, held-out perplexity of each pruned copy."""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from .selection import baselines
from .evaluate import perplexity
from .selection.registry import SELECTORS, get_selector
from .pruning import remove_blocks

# method name -> what it is; "sglp-<selector>" = Fisher segments + that selector of selection.registry
# (every selector but "random", which the peer "random" below already covers), then the peers
METHODS = {
    **{f"sglp-{s.name}": f"Fisher segments of the CKA matrix, "
       + (f"lowest per segment: {s.description}" if s.kind == "ranking" else s.description)
       for s in SELECTORS.values() if s.name != "random"},
    "shortgpt": "ShortGPT: least block influence (1 - cos(h_in, h_out)) over the whole depth",
    "angular": "Gromov et al.: contiguous run with the smallest last-token angular distance",
    "replaceme": "ReplaceMe: Gromov's run + one unweighted least-squares map (alpha 0) folded into the block before it",
    "last": "drop the last n blocks",
    "random": "n blocks at random (seeded)",
}
DEFAULT_METHODS = tuple(METHODS)


@dataclasses.dataclass(frozen=True)
class CompareRow:
    method: str
    remove: int
    removed: tuple[int, ...]
    perplexity: float
    compensated: bool = False


def _sglp_plan(method: str, analysis: Any, n: int) -> Any:
    """The plan of selector ``method`` = "sglp-<selector>" for ``n`` blocks."""
    scorer = method[len("sglp-"):]
    if get_selector(scorer).score not in analysis.scores:
        raise ValueError(f"methods: {method!r} needs scores {scorer!r}, computed: {sorted(analysis.scores)}")
    return analysis.plan_for(remove=n, scorer=scorer)


def removed_by(method: str, analysis: Any, n: int, seed: int = 0) -> list[int]:
    """The blocks ``method`` removes for a budget of ``n`` blocks, from one analysis."""
    L = analysis.model_info["num_blocks"]
    if method.startswith("sglp-"):
        return list(_sglp_plan(method, analysis, n).removed or [])
    if method == "shortgpt":
        return baselines.shortgpt(analysis.scores["block_influence"], n)
    if method in ("angular", "replaceme"):
        if analysis.last_token_hidden is None:
            raise ValueError(f"methods: {method!r} needs analyze(..., collect_last_token=True)")
        return baselines.angular_contiguous(analysis.last_token_hidden, n)
    if method == "last":
        return baselines.last_blocks(L, n)
    if method == "random":
        return baselines.random_blocks(L, n, seed)
    raise ValueError(f"methods: unknown method {method!r}; choose from {sorted(METHODS)}")


def plan_of(method: str, analysis: Any, n: int, seed: int = 0) -> tuple[list[int], dict | None]:
    """(removed blocks, compensation maps or None): an sglp selector's plan may also compensate."""
    if method.startswith("sglp-"):
        plan = _sglp_plan(method, analysis, n)
        return list(plan.removed or []), plan.transforms
    removed = removed_by(method, analysis, n, seed)
    if method == "replaceme":
        return removed, replaceme_maps(analysis, removed)
    return removed, None


def replaceme_maps(analysis: Any, removed: Sequence[int]) -> dict | None:
    """ReplaceMe's map of the removed run: unweighted least squares, no ridge, on every calibration window
    (the analysis' kept block inputs, plus its fit-only and self-sampled windows: the same data as the
    default's maps, so the comparison is of the methods, not of their data); None when the run starts at
    block 0."""
    if analysis.verifier is None or analysis.verifier.closed or not analysis.compensate:
        raise ValueError("methods: 'replaceme' fits its map on the kept block inputs of an analysis with "
                         "scorer 'verified' and compensation on; analyze(..., scorer='verified')")
    return analysis.verifier.transforms(removed, policy="replaceme") or None


def compare(analysis: Any, removes: Sequence[int], eval_ids: torch.Tensor, methods: Sequence[str] = DEFAULT_METHODS,
            seed: int = 0, batch_size: int = 4, progress: Any = None) -> tuple[float, list[CompareRow]]:
    """(perplexity of the unpruned model, one row per method x budget); identical block sets are scored once."""
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"methods: unknown method {m!r}; choose from {sorted(METHODS)}")
    base = perplexity(analysis.model, eval_ids, batch_size=batch_size).perplexity
    cache: dict[tuple, float] = {((), False): base}
    rows = []
    for n in removes:
        for m in methods:
            removed_list, transforms = plan_of(m, analysis, n, seed)
            removed = tuple(removed_list)
            key = (removed, bool(transforms))
            if key not in cache:
                pruned = remove_blocks(copy.deepcopy(analysis.model), removed, transforms)
                cache[key] = perplexity(pruned, eval_ids, batch_size=batch_size).perplexity
                del pruned
            rows.append(CompareRow(m, n, removed, cache[key], bool(transforms)))
            if progress is not None:
                progress(rows[-1])
    return base, rows


def markdown_table(base_ppl: float, rows: Sequence[CompareRow]) -> str:
    """Methods as rows, budgets as columns, the best perplexity of each budget in bold."""
    budgets = sorted({r.remove for r in rows})
    methods = list(dict.fromkeys(r.method for r in rows))
    best = {n: min(r.perplexity for r in rows if r.remove == n) for n in budgets}
    lines = ["| method | " + " | ".join(f"remove {n}" for n in budgets) + " |",
             "|---|" + "---:|" * len(budgets)]
    for m in methods:
        cells = []
        for n in budgets:
            r = next(r for r in rows if r.method == m and r.remove == n)
            cell = f"{r.perplexity:.2f}"
            cells.append(f"**{cell}**" if r.perplexity == best[n] else cell)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append(f"| (unpruned) | " + " | ".join(f"{base_ppl:.2f}" for _ in budgets) + " |")
    return "\n".join(lines)


def removed_table(rows: Sequence[CompareRow]) -> str:
    lines = ["| method | remove | removed blocks |", "|---|---:|---|"]
    lines += [f"| {r.method} | {r.remove} | {', '.join(map(str, r.removed))}{' (+compensation)' if r.compensated else ''} |"
              for r in rows]
    return "\n".join(lines)
