"""Cost of the default plan vs the paper's pipeline on SmolLM2-135M, timed alone on an idle machine.

    .venv/bin/python benchmarks/cost_smollm2.py            # writes benchmarks/results/cost_smollm2.md

Issue 15's cost target: planning 8 removals with the default (verified search + compensation) takes at most
2x the wall time of the paper's GradNorm pipeline at 16 x 256 calibration tokens. Per calibration subset (the
quality benchmark's: windows 16s..16s+15 of the built-in text) it times ``analyze(remove=8)`` with
``scorer="gradnorm"`` and with the default, alternating (paper, default) so that a slow spell of the machine
hits both, after one untimed warm-up of each; the default without its self-sampled fit windows
(``self_fit_windows=0``, the round-5 default) is timed in the same rotation, so the sampling's share is
measured, not estimated; so is the default with shorter sampled windows (``--short-samples``: 64 windows of
64 tokens, sampled 64 at a time: the same tokens in a quarter of the steps, docs/quality.md round 11). Then
the extra fit-only windows (``fit_windows``): the default
with N extra windows against the default without, on subset 0: the cost per extra window. The ratios are
measured in one run on one machine; absolute seconds are this CPU's only.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch

from sglp_fast import __version__, analyze
from sglp_fast.calibration.self_text import sampling_batch
from sglp_fast.calibration.text import CalibrationData, builtin_text, tokenize_windows
from sglp_fast.models import load_model
from sglp_fast.models.loading import default_model_path

HERE = os.path.dirname(os.path.abspath(__file__))


def timed(model, tok, data, **kwargs) -> tuple[float, dict]:
    t0 = time.perf_counter()
    analysis = analyze(model, data, tokenizer=tok, **kwargs)
    seconds = time.perf_counter() - t0
    sel = analysis.plan.extra.get("selection", {})
    info = {"removed": analysis.plan.removed, "block_forwards": sel.get("block_forwards"),
            "calibrate_s": analysis.timings.get("calibrate_s", 0.0), "plan_s": analysis.timings.get("plan_s", 0.0),
            "sample_s": analysis.timings.get("sample_s", 0.0), "self_fit_windows": analysis.search.self_fit_windows}
    analysis.close()
    return seconds, info


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--remove", type=int, default=8)
    p.add_argument("--calib-seqs", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--subsets", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--fit-windows", type=int, default=32, help="extra fit-only windows for the per-window cost")
    p.add_argument("--short-samples", type=int, nargs=2, default=(64, 64), metavar=("WINDOWS", "TOKENS"),
                   help="the default with this many self-sampled windows of this many tokens, timed beside it")
    p.add_argument("--out", default=os.path.join(HERE, "results", "cost_smollm2.md"))
    args = p.parse_args()

    model, tok = load_model(default_model_path(), dtype=torch.float32, device="cpu")
    top = max(args.subsets) + 1
    windows = tokenize_windows(tok, builtin_text("calib"), args.calib_seqs * top + args.fit_windows, args.seq_len)

    def subset(s: int, extra: int = 0) -> CalibrationData:
        ids = windows[s * args.calib_seqs:(s + 1) * args.calib_seqs]
        if extra:  # fit-only windows: past every subset's windows (analyze takes the last `extra` as fit-only)
            ids = torch.cat([ids, windows[top * args.calib_seqs:top * args.calib_seqs + extra]])
        return CalibrationData(ids, source=f"builtin windows {s * args.calib_seqs}..", seed=0)

    common = dict(remove=args.remove, calib_seqs=args.calib_seqs, seq_len=args.seq_len)
    timed(model, tok, subset(0), scorer="gradnorm", **common)  # warm-up: first-call costs out of the timings
    timed(model, tok, subset(0), **common)
    rows, shorts = [], []
    short_n, short_len = args.short_samples
    for s in args.subsets:
        t_paper, paper = timed(model, tok, subset(s), scorer="gradnorm", **common)
        t_default, default = timed(model, tok, subset(s), **common)
        t_noself, _ = timed(model, tok, subset(s), self_fit_windows=0, **common)
        t_short, short = timed(model, tok, subset(s), self_fit_windows=short_n, self_fit_len=short_len, **common)
        rows.append((s, t_paper, t_default, paper, default, t_noself))
        shorts.append((t_short, short))
        print(f"subset {s}: paper {t_paper:.1f} s, default {t_default:.1f} s ({t_default / t_paper:.2f}x), without "
              f"self-sampled windows {t_noself:.1f} s, {short_n} x {short_len} sampled {t_short:.1f} s",
              file=sys.stderr, flush=True)
    t_plain, _ = timed(model, tok, subset(0), **common)
    t_fit, fit = timed(model, tok, subset(0, args.fit_windows), fit_windows=args.fit_windows, **common)
    per_window = (t_fit - t_plain) / args.fit_windows
    print(f"fit windows: {t_plain:.1f} s -> {t_fit:.1f} s with {args.fit_windows}", file=sys.stderr, flush=True)

    ratios = [d / p for _, p, d, _, _, _ in rows]
    ratios_noself = [n / p for _, p, _, _, _, n in rows]
    table = "\n".join(
        f"| {s} | {tp:.1f} | {td:.1f} | **{td / tp:.2f}x** | {pa['calibrate_s']:.1f} + {pa['plan_s']:.1f} | "
        f"{de['sample_s']:.1f} + {de['calibrate_s']:.1f} + {de['plan_s']:.1f} | {de['block_forwards']:.0f} | "
        f"{tn:.1f} ({tn / tp:.2f}x) | {ts:.1f} ({ts / tp:.2f}x): {sh['sample_s']:.1f} + {sh['calibrate_s']:.1f} + "
        f"{sh['plan_s']:.1f} |"
        for (s, tp, td, pa, de, tn), (ts, sh) in zip(rows, shorts))
    ratios_short = [ts / p for (_, p, *_), (ts, _) in zip(rows, shorts)]
    per_sampled = statistics.mean(d - n for _, _, d, _, _, n in rows) / max(1, rows[0][4]["self_fit_windows"])
    verdict = "met" if max(ratios) <= 2 else "**not met**"
    text = f"""# Cost: the default plan vs the paper's pipeline on SmolLM2-135M (timed alone)

Date: {datetime.date.today().isoformat()}. Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores,
torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}, sglp-fast {__version__}.
Regenerate with `.venv/bin/python benchmarks/cost_smollm2.py` on an otherwise idle machine.

One `analyze(remove={args.remove})` per pipeline and calibration subset ({args.calib_seqs} x {args.seq_len} tokens,
subset s = windows {args.calib_seqs}s.. of the built-in text, as in quality_smollm2.md), the two pipelines
alternating after one untimed warm-up of each. Paper: `scorer="gradnorm"` (forward + backward, CKA, Fisher
segments, lowest GradNorm per segment). Default: forward only, CKA, segments, the verified search with
compensation (16 fit windows sampled from the model, statistics, cross-fitted compensated checks over every
window, plain checks of the candidates within one standard error of the lowest option (`plain_checks`
"band"), the final maps).

| subset | paper (s) | default (s) | default / paper | paper: calibrate + plan (s) | default: sample + calibrate + plan (s) | search block-forwards | default without self-sampled windows (s) | default, {short_n} sampled windows of {short_len} tokens (s): sample + calibrate + plan |
|---|---|---|---|---|---|---|---|---|
{table}

Default / paper: {min(ratios):.2f}x to {max(ratios):.2f}x, mean {statistics.mean(ratios):.2f}x (target: at most 2x): {verdict}.
Without the self-sampled fit windows (`--self-fit-windows 0`): {min(ratios_noself):.2f}x to {max(ratios_noself):.2f}x,
mean {statistics.mean(ratios_noself):.2f}x. A sampled window costs {per_sampled:.2f} s here, on the mean (sampling {args.seq_len}
tokens one step at a time, then its forward-only statistics pass).
With {short_n} sampled windows of {short_len} tokens instead (`--self-fit-windows {short_n} --self-fit-len {short_len}`, sampled
up to {sampling_batch(short_len)} at a time): {min(ratios_short):.2f}x to {max(ratios_short):.2f}x, mean {statistics.mean(ratios_short):.2f}x; plans:
{"; ".join(f"subset {r[0]}: {sh['removed']} (default: {r[4]['removed']})" for r, (_, sh) in zip(rows, shorts))}.

Extra fit-only windows (`--fit-windows`, forward only, they feed only the compensation statistics): on subset 0
the default took {t_plain:.1f} s without and {t_fit:.1f} s with {args.fit_windows} extra windows of {args.seq_len} tokens:
**{per_window:.2f} s per extra window** here (the whole default analysis spends {t_plain / args.calib_seqs:.2f} s per
calibration window); an extra window costs one forward-only pass of the model over it (several windows per
block call) plus the d x d statistics of the candidate runs. Plan with them: {fit['removed']}.
"""
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
