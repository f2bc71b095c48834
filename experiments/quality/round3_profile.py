"""Round 3: where the default analysis spends its time (usage: python round3_profile.py 0 verified gradnorm)."""
import time, sys, torch, functools
from sglp_fast import analyze
from sglp_fast.calibration.text import CalibrationData, builtin_text, tokenize_windows
from sglp_fast.api import default_model_source
from sglp_fast.models import load_model
import sglp_fast.selection.compensation as C, sglp_fast.selection.verifier as V
model, tok = load_model(default_model_source(), dtype=torch.float32, device="cpu")
s = int(sys.argv[1]) if len(sys.argv) > 1 else 0
calib_all = tokenize_windows(tok, builtin_text("calib"), 48, 256)
data = CalibrationData(calib_all[16*s:16*s+16], source="x", seed=0)
T = {}
def timed(name, f):
    @functools.wraps(f)
    def g(*a, **k):
        t = time.perf_counter(); r = f(*a, **k); T[name] = T.get(name, 0) + time.perf_counter() - t; return r
    return g
C.fit_transforms = timed("fit", C.fit_transforms)
V.SkipVerifier.losses = timed("losses", V.SkipVerifier.losses)
for sc in sys.argv[2:] or ["verified"]:
    T.clear(); t0 = time.perf_counter()
    a = analyze(model, data, tokenizer=tok, scorer=sc, remove=8, collect_last_token=True)
    print(sc, "total", round(time.perf_counter() - t0, 1), {k: round(v, 1) for k, v in a.timings.items()} if hasattr(a, "timings") else "", {k: round(v, 1) for k, v in T.items()})
    if sc == "verified": print(a.plan.extra["selection"]["block_forwards"], a.plan.extra["selection"]["picked"])
    a.close()
