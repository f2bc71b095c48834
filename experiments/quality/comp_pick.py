"""Verified pick with compensation: each candidate plan plain and compensated (fit on calibration windows
4..15, alpha 1, row-normalized ridge), calibration loss on windows 0..3, held-out PPL on A and B.
usage: python comp_pick.py SUBSET"""
import json
import sys

import numpy as np
import torch

from common import CACHE, Runner, load, stream_ids, texts, windows
from compensate import compensate, ppl_from

torch.set_grad_enabled(False)


def main():
    s = int(sys.argv[1])
    model, tok = load()
    r = Runner(model)
    import glob
    planned = {}
    for p in sorted(glob.glob(f"{CACHE}/results_{s}*.json")):
        for m, v in json.load(open(p)).get("methods", {}).items():
            for n, row in v.items():
                planned.setdefault(m, {})[n] = row["removed"]
    cands_all = ["greedy_verified_relupd", "frame_global_relupd", "sglp_relupd", "shortgpt_bi", "gromov_angular"]
    st = torch.load(f"{CACHE}/calib_states_{s}.pt")["states"]
    tx = texts()
    ev = {e: (torch.load(f"{CACHE}/dense_states_{e}.pt"), windows(stream_ids(tok, tx[e]), 8)) for e in ("heldA", "heldB")}
    stats = torch.load(f"{CACHE}/calib_stats_{s}.pt", weights_only=False)
    cid = stats["ids"][:4]
    out = {}
    for n in ("4", "6", "8"):
        out[n] = {}
        for name in cands_all:
            removed = planned.get(name, {}).get(n)
            if removed is None:
                continue
            row = {}
            start = max(min(removed) - 1, 0)
            val = st[:, :4]
            def closs():
                h = val[start].clone()
                for l in range(start, r.L):
                    if l not in removed:
                        h = r.block(l, h)
                tot, cnt = r.nll(h, cid)
                return tot / cnt
            row["plain_calib"] = closs()
            for e, (es, ids) in ev.items():
                row[f"plain_{e}"] = ppl_from(r, es, ids, removed, start)
            saved = compensate(r, st[:, 4:], removed, 1.0, "rownorm")
            row["comp_calib"] = closs()
            for e, (es, ids) in ev.items():
                row[f"comp_{e}"] = ppl_from(r, es, ids, removed, start)
            for l, W in saved.items():
                r.blocks[l].mlp.down_proj.weight.data = W
            out[n][name] = {"removed": removed, **row}
            print(s, n, name, removed, {k: round(v, 4) for k, v in row.items()}, flush=True)
    json.dump(out, open(f"{CACHE}/comp_pick_{s}.json", "w"), indent=1)


if __name__ == "__main__":
    main()
