"""Round 3: greedy on/off x final refit on/off (usage: python round3_variants.py 0,2 [4])."""
import os, sys, time, json, torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
import quality_smollm2 as Q
from sglp_fast import analyze
from sglp_fast.calibration.text import CalibrationData, builtin_text, tokenize_windows
from sglp_fast.api import default_model_source
from sglp_fast.models import load_model
model, tok = load_model(default_model_source(), dtype=torch.float32, device="cpu")
calib_all = tokenize_windows(tok, builtin_text("calib"), 48, 256)
texts = {"A": tokenize_windows(tok, builtin_text("heldout"), 8, 256), "B": tokenize_windows(tok, Q.readme_text(), 8, 256)}
sc = Q.Scorer(model, texts)
subsets = [int(x) for x in sys.argv[1].split(",")]
vws = [int(x) for x in sys.argv[2].split(",")] if len(sys.argv) > 2 else [4]
out = {}
for s in subsets:
    data = CalibrationData(calib_all[16*s:16*s+16], source="x", seed=0)
    for vw in vws:
        a = analyze(model, data, tokenizer=tok, remove=None, verify_windows=vw)
        for greedy in (True, False):
            a.greedy = greedy  # plan_for reads it
            for n in (4, 6, 8):
                p = a.plan_for(remove=n)
                sel = p.extra["selection"]
                for refit in (False, True):
                    T = p.transforms if refit else (a.verifier.transforms(p.removed) if p.transforms else None)
                    res = sc(p.removed, T, tag=(s, vw, n, refit))
                    key = f"s{s} vw{vw} greedy={greedy} refit={refit} n{n}"
                    out[key] = {"removed": p.removed, "picked": sel["picked"], "comp": sel["compensated"], **res}
                    print(key, p.removed, sel["picked"], sel["compensated"], {k: round(v, 2) for k, v in res.items()}, flush=True)
        a.close()
json.dump(out, open(f"variants_{sys.argv[1]}_{vws}.json", "w"), indent=1)
