"""k sweep on benchmark subset 0: paper GradNorm (proportional split) for k=1..6 and the default for k=2..5."""
import os, sys, json, torch, numpy as np
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
import quality_smollm2 as Q
from sglp_fast import analyze
from sglp_fast.segmentation.fisher import fisher_segment
from sglp_fast.plan import select_removed, split_budget
from sglp_fast.calibration.text import CalibrationData, builtin_text, tokenize_windows
from sglp_fast.api import default_model_source
from sglp_fast.models import load_model
model, tok = load_model(default_model_source(), dtype=torch.float32, device="cpu")
calib_all = tokenize_windows(tok, builtin_text("calib"), 48, 256)
texts = {"A": tokenize_windows(tok, builtin_text("heldout"), 8, 256), "B": tokenize_windows(tok, Q.readme_text(), 8, 256)}
sc = Q.Scorer(model, texts)
data = CalibrationData(calib_all[0:16], source="x", seed=0)
out = {}
paper = analyze(model, data, tokenizer=tok, scorer="gradnorm")
auto = paper.segmentation
print("auto k", auto.k, auto.segments, flush=True)
for k in range(1, 7):
    seg = fisher_segment(paper.cka, k=k).segments
    for n in (4, 6, 8):
        for name in ("gradnorm", "relative_update"):
            removed = select_removed(seg, np.asarray(paper.scores[name]), split_budget(seg, n), set())
            res = sc(removed)
            out[f"paper k{k} n{n} {name}"] = dict(segments=[list(x) for x in seg], removed=removed, **res)
            print(f"k{k} n{n} {name:16s} {seg} {removed} A {res['A']:.1f} B {res['B']:.1f}", flush=True)
paper.close()
for k in (2, 4, 5):
    with analyze(model, data, tokenizer=tok, segments=k, remove=8) as a:
        for n in (6, 8):
            p = a.plan if n == 8 else a.plan_for(remove=n)
            res = sc(p.removed, p.transforms, tag=("k", k, n))
            out[f"default k{k} n{n}"] = dict(segments=[list(x) for x in p.segments], removed=p.removed, picked=p.extra["selection"]["picked"], **res)
            print(f"default k{k} n{n} {p.segments} {p.removed} {p.extra['selection']['picked']} A {res['A']:.1f} B {res['B']:.1f}", flush=True)
json.dump(out, open("ksweep.json", "w"), indent=1)
