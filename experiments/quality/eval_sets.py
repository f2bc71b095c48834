"""Evaluate removal sets already planned (recorded in cache/results_SEED*.json for another text) on TEXT.

Usage: python eval_sets.py SEED TEXT METHOD[,METHOD...]  -> cache/results_SEED-S.json"""
import glob
import json
import sys

from common import CACHE, Evaluator, Runner, load, stream_ids, texts, windows
from run_eval import N_EVAL


def main(seed, text, meths):
    planned = {}
    for p in sorted(glob.glob(f"{CACHE}/results_{seed}*.json")):
        for m, v in json.load(open(p)).get("methods", {}).items():
            for n, row in v.items():
                planned.setdefault(m, {})[n] = {"removed": row["removed"], "extra_blocks": row["extra_blocks"]}
    model, tok = load()
    ev = Evaluator(Runner(model), windows(stream_ids(tok, texts()[text]), N_EVAL), text)
    out = {text: {"dense": ev.ppl([])}, "methods": {}}
    path = f"{CACHE}/results_{seed}-S{'-'.join(meths)}.json"
    for m in meths:
        for n, row in sorted(planned.get(m, {}).items()):
            row = dict(row)
            row[text] = ev.ppl(row["removed"])
            out["methods"].setdefault(m, {})[n] = row
            print(m, n, row, flush=True)
            json.dump(out, open(path, "w"), indent=1)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3].split(","))
