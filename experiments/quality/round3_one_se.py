"""Round 3 follow-up (not adopted yet): how noisy is the 4-window check? Per check window, the compensated loss
of each candidate, and the standard error of the paired differences to the picked plan (1-SE rule data).
Usage: python round3_one_se.py 2,0"""
import os, sys, torch, numpy as np
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
from sglp_fast import analyze
import sglp_fast.calibration.losses as G
from sglp_fast.selection.compensation import runs_of
from sglp_fast.calibration.text import CalibrationData, builtin_text, tokenize_windows
from sglp_fast.api import default_model_source
from sglp_fast.models import load_model
model, tok = load_model(default_model_source(), dtype=torch.float32, device="cpu")
calib_all = tokenize_windows(tok, builtin_text("calib"), 48, 256)
for s in [int(x) for x in sys.argv[1].split(",")]:
    data = CalibrationData(calib_all[16*s:16*s+16], source="x", seed=0)
    with analyze(model, data, tokenizer=tok) as a:
        ver = a.verifier
        orig = ver._loss_sum
        for n in (4, 6, 8):
            p = a.plan_for(remove=n)
            sel = p.extra["selection"]
            per = {}
            for name, c in sel["candidates"].items():
                if c.get("calib_loss") is None:
                    continue
                rec = []
                ver._loss_sum = lambda h, b, rec=rec: (lambda v: (rec.append((b, float(v))), v)[1])(orig(h, b))
                ver._memo.pop((frozenset(c["removed"]), True, False), None)
                ver.losses([c["removed"]], compensated=True)
                ver._loss_sum = orig
                per[name] = np.array([v / G.loss_count(ver._kind, ver._batches[b]) for b, v in rec])
            best = sel["picked"]
            for name, v in per.items():
                d = v - per[best]
                se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
                print(f"s{s} n{n} {name:28s} runs {len(runs_of(sel['candidates'][name]['removed']))} "
                      f"mean {v.mean():.4f} diff-to-pick {d.mean():+.4f} se {se:.4f} per-window {np.round(v, 3).tolist()}"
                      + ("  <- pick" if name == best else ""), flush=True)
