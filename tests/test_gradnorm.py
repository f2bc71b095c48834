"""Layer-wise GradNorm (top-down recompute + backward) == full-model autograd, every family."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sglp_fast.calibration.runtime import calibrate
from tiny_models import (FAMILIES, RecordingObserver, reference_block_grads, reference_loss, rel, tiny_batches,
                         tiny_model)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradnorm_matches_full_autograd_fp32(family):
    model = tiny_model(family, seed=3)
    batches = tiny_batches(family, seed=4)
    res = calibrate(model, batches, progress=False)
    loss, gn, wn, ty, per = reference_block_grads(model, family, batches)
    assert abs(res.loss - loss) <= 1e-5 * abs(loss)
    assert rel(res.grad_norm, gn) <= 1e-5
    assert rel(res.weight_norm, wn) <= 1e-6
    assert rel(res.taylor, ty) <= 1e-5
    assert set(res.param_grad_norms) == set(per)
    names = sorted(per)
    assert rel([res.param_grad_norms[n] for n in names], [per[n] for n in names]) <= 1e-5
    assert np.all(res.grad_norm > 0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_gradnorm_float64_reference(family):
    """Layer-wise in float64 (blocks converted per use) vs the float64 full model: ~machine precision."""
    model = tiny_model(family, seed=5)
    batches = tiny_batches(family, seed=6)
    res = calibrate(model, batches, dtype=torch.float64, progress=False)  # fp32 weights, fp64 compute copies
    ref_model = tiny_model(family, seed=5, dtype=torch.float64)
    loss, gn, _, _, _ = reference_block_grads(ref_model, family, batches)
    assert abs(res.loss - loss) <= 1e-10 * abs(loss)
    assert rel(res.grad_norm, gn) <= 1e-10


def test_gradnorm_detects_a_wrong_gradient():
    """The comparison can fail: scaling one block's weights changes its GradNorm and the test sees it."""
    model = tiny_model("llama", seed=7)
    batches = tiny_batches("llama", seed=8)
    res = calibrate(model, batches, progress=False)
    with torch.no_grad():
        for p in model.model.layers[1].parameters():
            p.mul_(1.5)
    _, gn, _, _, _ = reference_block_grads(model, "llama", batches)
    assert rel(res.grad_norm, gn) > 1e-3


def test_gradients_off_gives_no_gradnorm_but_same_loss():
    model = tiny_model("gpt2", seed=9)
    batches = tiny_batches("gpt2", seed=10)
    with_g = calibrate(model, batches, progress=False)
    without = calibrate(model, batches, gradients=False, progress=False)
    assert without.grad_norm is None and without.taylor is None
    assert without.loss == with_g.loss
    np.testing.assert_array_equal(without.block_influence, with_g.block_influence)


@pytest.mark.slow
def test_gradnorm_smollm2_real_model():
    from sglp_fast.models import load_model

    model, tok = load_model(None)  # the packaged SmolLM2-135M GGUF
    ids = tok("The quick brown fox jumps over the lazy dog. Layer pruning keeps", return_tensors="pt")["input_ids"]
    batches = [{"input_ids": ids[:, :12]}, {"input_ids": ids[:, 2:9]}]
    rec = RecordingObserver()
    res = calibrate(model, batches, observers=[rec], progress=False)
    with torch.no_grad():  # hidden states == output_hidden_states (the last entry is after the final norm)
        for b, batch in enumerate(batches):
            hs = model(**batch, output_hidden_states=True).hidden_states
            for l in range(29):
                assert rel(rec.outputs[(l, b)], hs[l + 1]) <= 1e-5, (l, b)
    loss, gn, _, _, _ = reference_block_grads(model, "llama", batches)
    assert res.num_blocks == 30
    assert abs(res.loss - loss) <= 1e-5 * abs(loss)
    assert rel(res.grad_norm, gn) <= 1e-5
    # a GGUF-loaded model, pruned, saves and reloads with plain transformers
    import tempfile

    import transformers as tf

    from sglp_fast.models import get_adapter

    get_adapter(model).remove_blocks([5, 20])
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        model.save_pretrained(d)
        back = tf.AutoModelForCausalLM.from_pretrained(d).eval()
        assert back.config.num_hidden_layers == 28
        assert rel(back(ids[:, :8], use_cache=False).logits, model(ids[:, :8], use_cache=False).logits) <= 1e-6


@pytest.mark.parametrize("family", ["mistral", "qwen3", "phi3", "gemma"])
def test_rest_of_llama_family(family, tmp_path):
    """Hidden states, GradNorm and remove_blocks + reload for the other model.layers + rotary members."""
    import transformers as tf

    from sglp_fast.models import get_adapter

    model = tiny_model(family, layers=3, seed=13)
    batches = tiny_batches(family, seed=14)
    rec = RecordingObserver()
    res = calibrate(model, batches, observers=[rec], progress=False)
    with torch.no_grad():
        _, hooked = reference_loss(model, family, batches)
    for (l, b), out in rec.outputs.items():
        assert rel(out, hooked[l][b]) <= 1e-5
    loss, gn, _, _, _ = reference_block_grads(model, family, batches)
    assert abs(res.loss - loss) <= 1e-5 * loss and rel(res.grad_norm, gn) <= 1e-5
    get_adapter(model).remove_blocks([1])
    model.save_pretrained(tmp_path)
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = batches[0]["input_ids"][:, :6]
    with torch.no_grad():
        assert rel(back(ids, use_cache=False).logits, model(ids, use_cache=False).logits) <= 1e-6
        kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(back.generate(ids, use_cache=True, **kw), back.generate(ids, use_cache=False, **kw))
