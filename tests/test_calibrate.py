"""The layer-by-layer driver: hidden states == the full model's, observers, loss, determinism, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sglp_fast.calibration.runtime import NonFiniteActivationError, calibrate
from sglp_fast.models import get_adapter
from tiny_models import FAMILIES, RecordingObserver, reference_loss, rel, tiny_batches, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_match_full_model(family):
    model = tiny_model(family, layers=4, seed=21)
    batches = tiny_batches(family, seed=22)
    rec = RecordingObserver()
    res = calibrate(model, batches, observers=[rec], gradients=False, progress=False)
    with torch.no_grad():
        ref_loss, hooked = reference_loss(model, family, batches)
        for b, batch in enumerate(batches):
            kwargs = dict(batch) if family.startswith("bert") else dict(batch, use_cache=False)
            hs = model(**kwargs, output_hidden_states=True).hidden_states
            if family != "opt":  # OPT's hidden_states[0] is before project_in/positions: compare via hooks only
                assert rel(rec.inputs[(0, b)], hs[0]) <= 1e-6
            for l in range(4):
                assert rel(rec.outputs[(l, b)], hooked[l][b]) <= 1e-5, (l, b)
                if l < 3:  # the last entry of output_hidden_states is after the final norm in most families
                    assert rel(rec.outputs[(l, b)], hs[l + 1]) <= 1e-5, (l, b)
    assert abs(res.loss - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))


def test_observer_order_masks_and_chaining():
    model = tiny_model("llama", layers=3, seed=23)
    batches = tiny_batches("llama", seed=24)
    rec = RecordingObserver()
    calibrate(model, batches, observers=[rec], progress=False)
    assert rec.order == [(l, b) for l in range(3) for b in range(3)]  # layer-major
    for l in range(2):
        for b in range(3):
            assert torch.equal(rec.inputs[(l + 1, b)], rec.outputs[(l, b)])
    assert torch.equal(rec.masks[(0, 2)], batches[2]["attention_mask"].bool())
    assert rec.masks[(1, 0)].all() and rec.masks[(1, 0)].shape == (1, 17)
    assert rec.outputs[(0, 0)].dtype == torch.float32 and rec.outputs[(0, 0)].shape == (1, 17, 32)


def _token_mean(rec, batches, layer, per_token):
    """Float64 mean over unmasked tokens of per_token(block input, block output), from the recorded tensors."""
    num = den = 0.0
    for b, batch in enumerate(batches):
        x, y = rec.inputs[(layer, b)].double(), rec.outputs[(layer, b)].double()
        m = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
        num += float(per_token(x, y)[m].sum())
        den += int(m.sum())
    return num / den


def test_block_influence_matches_definition():
    model = tiny_model("gpt_neox", layers=3, seed=25)
    batches = tiny_batches("gpt_neox", seed=26)
    rec = RecordingObserver()
    res = calibrate(model, batches, observers=[rec], gradients=False, progress=False)
    for l in range(3):
        ref = _token_mean(rec, batches, l, lambda x, y: 1 - (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)))
        assert abs(res.block_influence[l] - ref) <= 1e-6
    assert res.tokens == sum(int(b.get("attention_mask", torch.ones_like(b["input_ids"])).sum()) for b in batches)


def test_relative_update_matches_definition():
    model = tiny_model("llama", layers=3, seed=29)
    batches = tiny_batches("llama", seed=30)
    rec = RecordingObserver()
    res = calibrate(model, batches, observers=[rec], gradients=False, progress=False)
    for l in range(3):
        ref = _token_mean(rec, batches, l, lambda x, y: (y - x).norm(dim=-1) / x.norm(dim=-1))
        assert abs(res.relative_update[l] - ref) <= 1e-6 * max(1.0, ref)


def test_deterministic_across_runs():
    model = tiny_model("qwen2", layers=3, seed=27)
    batches = tiny_batches("qwen2", seed=28)
    r1 = calibrate(model, batches, seed=5, progress=False)
    r2 = calibrate(model, batches, seed=5, progress=False)
    assert r1.loss == r2.loss
    np.testing.assert_array_equal(r1.grad_norm, r2.grad_norm)
    np.testing.assert_array_equal(r1.block_influence, r2.block_influence)
    assert r1.param_grad_norms == r2.param_grad_norms


def test_model_state_restored():
    model = tiny_model("llama", layers=2, seed=29).train()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calibrate(model, tiny_batches("llama"), progress=False)
    assert model.training
    assert not model.model.layers[0].mlp.up_proj.weight.requires_grad
    assert model.model.layers[1].mlp.up_proj.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_progress_plan_and_rate_are_printed(capsys):
    model = tiny_model("gpt2", layers=2, seed=30)
    res = calibrate(model, tiny_batches("gpt2"), progress=True)
    err = capsys.readouterr().err
    assert "memory plan" in err and "largest block" in err and "tok/s forward" in err
    assert "calibrating" in err and "gradients" in err
    assert res.memory_plan.startswith("memory plan")
    assert res.timings["tokens_per_s_forward"] > 0 and res.timings["tokens_per_s_backward"] > 0


def test_bfloat16_compute_close_to_fp32():
    model = tiny_model("llama", layers=3, seed=31)
    batches = tiny_batches("llama", seed=32)
    r32 = calibrate(model, batches, progress=False)
    r16 = calibrate(model, batches, dtype=torch.bfloat16, progress=False)
    assert abs(r16.loss - r32.loss) <= 1e-2 * r32.loss
    assert rel(r16.grad_norm, r32.grad_norm) <= 5e-2


# --- bad input ---------------------------------------------------------------------------------------------
def test_bad_batches():
    model = tiny_model("llama", layers=2)
    ids = torch.randint(0, 97, (1, 5))
    with pytest.raises(ValueError, match="empty"):
        calibrate(model, [], progress=False)
    with pytest.raises(TypeError, match=r"wrap a single batch as \[batch\]"):
        calibrate(model, {"input_ids": ids}, progress=False)
    with pytest.raises(TypeError, match="input_ids"):
        calibrate(model, [{"input_ids": ids.float()}], progress=False)
    with pytest.raises(TypeError, match="'input_ids'"):
        calibrate(model, [{"ids": ids}], progress=False)
    with pytest.raises(ValueError, match=r"shape \[batch, seq\]"):
        calibrate(model, [{"input_ids": ids[0]}], progress=False)
    with pytest.raises(ValueError, match=r"\[0, 97\)"):
        calibrate(model, [{"input_ids": ids + 200}], progress=False)
    with pytest.raises(ValueError, match="attention_mask"):
        calibrate(model, [{"input_ids": ids, "attention_mask": torch.ones(1, 4)}], progress=False)
    with pytest.raises(ValueError, match="fewer than 2 real tokens"):
        calibrate(model, [{"input_ids": ids[:, :1]}], progress=False)
    with pytest.raises(TypeError, match="observers"):
        calibrate(model, [{"input_ids": ids}], observers=[object()], progress=False)
    with pytest.raises(TypeError, match="dtype"):
        calibrate(model, [{"input_ids": ids}], dtype="bf16", progress=False)


def test_sequence_longer_than_model_supports():
    model = tiny_model("gpt2", layers=2)  # n_positions = 64
    with pytest.raises(ValueError, match=r"sequence length 65 exceeds the model's maximum of 64"):
        calibrate(model, [{"input_ids": torch.zeros(1, 65, dtype=torch.long)}], progress=False)


def test_nan_block_is_named_with_batch_and_fp32_hint():
    model = tiny_model("llama", layers=3, seed=33)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    batches = tiny_batches("llama")
    with pytest.raises(NonFiniteActivationError, match=r"block 1 \(batch 0\).*float32"):
        calibrate(model, batches, dtype=torch.bfloat16, progress=False)
    with pytest.raises(ValueError, match=r"block 1 \(batch 0\)"):
        calibrate(model, batches, progress=False)
