"""Does the final pick choose better with all 16 calibration windows? (subset SEED, budgets given)."""
import glob
import json
import sys

import torch

import methods as M
from common import CACHE, Runner, load

seed, budgets = int(sys.argv[1]), sys.argv[2].split(",")
cands = ["greedy_verified_relupd", "frame_global_relupd", "sglp_relupd", "shortgpt_bi", "gromov_angular"]
planned = {}
for p in sorted(glob.glob(f"{CACHE}/results_{seed}*.json")):
    for m, v in json.load(open(p)).get("methods", {}).items():
        for n, row in v.items():
            planned.setdefault(m, {})[n] = row["removed"]
model, tok = load()
r = Runner(model)
S = torch.load(f"{CACHE}/calib_stats_{seed}.pt", weights_only=False)
st = torch.load(f"{CACHE}/calib_states_{seed}.pt")["states"]
sl = M.SubsetLoss(r, st, S["ids"], nseq=16)
for n in budgets:
    sl.cost = 0.0
    losses = {m: sl(planned[m][n]) for m in cands}
    print(seed, n, "pick16 ->", min(losses, key=losses.get), {k: round(v, 4) for k, v in losses.items()},
          f"cost={sl.cost:.0f}", flush=True)
