"""Verification step across candidate plans: among the removal sets proposed by several planners for one
calibration subset, keep the one with the lowest calibration loss on a token subset (4 windows, run from the
cached dense state at the first removed block). Evaluates the pick on TEXT.

Usage: python pick_best.py SEED TEXT CANDIDATE_METHODS"""
import glob
import json
import sys

import torch

import methods as M
from common import CACHE, Evaluator, Runner, load, stream_ids, texts, windows
from run_eval import N_EVAL


def main(seed, text, cands):
    planned = {}
    for p in sorted(glob.glob(f"{CACHE}/results_{seed}*.json")):
        for m, v in json.load(open(p)).get("methods", {}).items():
            for n, row in v.items():
                planned.setdefault(m, {})[n] = (row["removed"], row["extra_blocks"])
    model, tok = load()
    r = Runner(model)
    S = torch.load(f"{CACHE}/calib_stats_{seed}.pt", weights_only=False)
    st = torch.load(f"{CACHE}/calib_states_{seed}.pt")["states"]
    sl = M.SubsetLoss(r, st, S["ids"], nseq=4)
    ev = Evaluator(r, windows(stream_ids(tok, texts()[text]), N_EVAL), text)
    out = {"methods": {}}
    for n in ("4", "6", "8"):
        sl.cost = 0.0
        options = {m: planned[m][n] for m in cands if m in planned and n in planned[m]}
        losses = {m: sl(rem) for m, (rem, _) in options.items()}
        best = min(losses, key=losses.get)
        extra = options.get("greedy_verified_relupd", ([], 0.0))[1] + sl.cost
        row = {"removed": options[best][0], "extra_blocks": extra, "picked": best, text: ev.ppl(options[best][0]),
               "calib_losses": losses}
        out["methods"].setdefault("verified_pick", {})[n] = row
        print(seed, n, row, flush=True)
        json.dump(out, open(f"{CACHE}/results_{seed}-P{text}.json", "w"), indent=1)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3].split(","))
