"""Round 3: the search's pick judged by KL to the dense model vs the label loss (usage: python round3_kl.py 2,0)."""
import os, sys, json, torch, torch.nn.functional as F
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
import quality_smollm2 as Q
from sglp_fast import analyze
import sglp_fast.calibration.losses as G
from sglp_fast.calibration.text import CalibrationData, builtin_text, tokenize_windows
from sglp_fast.api import default_model_source
from sglp_fast.models import load_model
model, tok = load_model(default_model_source(), dtype=torch.float32, device="cpu")
calib_all = tokenize_windows(tok, builtin_text("calib"), 48, 256)
texts = {"A": tokenize_windows(tok, builtin_text("heldout"), 8, 256), "B": tokenize_windows(tok, Q.readme_text(), 8, 256)}
sc = Q.Scorer(model, texts)
orig = G.loss_sum
dense = {}
def kl_sum(kind, output, batch):
    ids = batch["input_ids"]; mask = G.token_mask(batch)
    valid = mask[:, 1:] & mask[:, :-1]
    lp = F.log_softmax(output.logits[:, :-1].float(), -1)[valid]
    dl = dense[id(batch)]
    return (dl.exp() * (dl - lp)).sum()
out = {}
for s in [int(x) for x in sys.argv[1].split(",")]:
    data = CalibrationData(calib_all[16*s:16*s+16], source="x", seed=0)
    a = analyze(model, data, tokenizer=tok, remove=None, greedy=False)
    ver = a.verifier
    with torch.no_grad():
        for b in range(ver._nv):
            batch = ver._batches[b]; mask = G.token_mask(batch); valid = mask[:, 1:] & mask[:, :-1]
            o = ver.adapter.head_output(ver._cache.get(ver.num_blocks, b), batch)
            dense[id(batch)] = F.log_softmax(o.logits[:, :-1].float(), -1)[valid]
    for n in (4, 6, 8):
        p = a.plan_for(remove=n)
        cands = p.extra["selection"]["candidates"]
        names = [k for k, v in cands.items() if v.get("calib_loss") is not None]
        plans = [cands[k]["removed"] for k in names]
        saved = dict(ver._memo)
        ver._memo.clear(); G.loss_sum = kl_sum
        klp = ver.losses(plans); klc = ver.losses(plans, compensated=True)
        G.loss_sum = orig; ver._memo.clear(); ver._memo.update(saved)
        for k, kp, kc in zip(names, klp, klc):
            c = cands[k]
            T = ver.transforms(c["removed"], all_windows=True)
            res = sc(c["removed"], T, tag=(s, n, "refit"))
            row = dict(removed=c["removed"], nll_plain=c["calib_loss"], nll_comp=c["calib_loss_compensated"], kl_plain=kp, kl_comp=kc, **res)
            out[f"s{s} n{n} {k}"] = row
            print(f"s{s} n{n} {k:28s} {str(c['removed']):28s} nll {c['calib_loss']:.3f}/{c['calib_loss_compensated']:.3f} kl {kp:.4f}/{kc:.4f} | comp A {res['A']:.2f} B {res['B']:.2f}", flush=True)
        print(f"s{s} n{n} PICK nll: {p.extra['selection']['picked']}", flush=True)
    a.close()
json.dump(out, open(f"kl_{sys.argv[1]}.json", "w"), indent=1)
