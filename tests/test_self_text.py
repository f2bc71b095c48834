"""Windows the model samples itself (calibration/self_text.py) and the setting that feeds them to the maps."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from sglp_fast.calibration.self_text import _SEED_STRIDE, _gumbel, sample_windows, start_token
from sglp_fast.selection.settings import DEFAULT_SELF_FIT_WINDOWS, SearchSettings
from tiny_models import CAUSAL, tiny_model


def _reference_window(model, index: int, seq_len: int, start: int, seed: int) -> list[int]:
    """Window ``index`` sampled the slow way: the whole prefix re-run at every step (no key-value cache),
    Gumbel-max written out with the window's own generator."""
    g = torch.Generator().manual_seed(seed * _SEED_STRIDE + index)
    ids = [start]
    with torch.no_grad():
        for _ in range(seq_len - 1):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
            u = torch.rand(logits.shape[-1], generator=g).clamp_(min=torch.finfo(torch.float32).tiny).double()
            ids.append(int((logits - torch.log(-torch.log(u))).argmax()))
    return ids


@pytest.mark.parametrize("family", CAUSAL)
def test_sampled_windows_equal_a_cacheless_reference(family):
    """float64 tiny model (no argmax ties from rounding): the cached sampler gives the reference's tokens, for
    every causal family (each has its own cache), in batches of 2 over 3 windows (n not a multiple of the batch)."""
    model = tiny_model(family, layers=2, seed=3, dtype=torch.float64)
    got = sample_windows(model, [0, 1, 2], 9, start=5, seed=7, batch=2)
    assert got.dtype == torch.long and got.shape == (3, 9)
    for row, index in enumerate([0, 1, 2]):
        assert got[row].tolist() == _reference_window(model, index, 9, 5, 7), (family, index)
    assert len({tuple(r) for r in got.tolist()}) == 3  # three different samples


def test_a_window_is_the_same_in_any_batch_and_any_share():
    """Window i's tokens depend on (seed, i) only: the same alone, in another batch, in another rank's share;
    another seed gives other windows. seq_len 1 is the start token alone."""
    model = tiny_model("llama", layers=2, seed=4)
    every = sample_windows(model, range(5), 12, start=1, seed=0, batch=2)
    assert torch.equal(sample_windows(model, [3], 12, start=1, seed=0, batch=1)[0], every[3])
    assert torch.equal(sample_windows(model, [1, 3, 4], 12, start=1, seed=0, batch=16), every[[1, 3, 4]])
    assert not torch.equal(sample_windows(model, range(5), 12, start=1, seed=1), every)
    assert (every[:, 0] == 1).all()
    assert sample_windows(model, [0, 1], 1, start=1).tolist() == [[1], [1]]
    assert sample_windows(model, [], 12, start=1).shape == (0, 12)
    assert not model.training


def test_gumbel_max_draws_from_the_softmax():
    """argmax(logits + Gumbel noise) is a draw from softmax(logits): frequencies within 4.5 binomial standard
    errors of the probabilities over 6000 draws (a sign error or uniform noise fails by tens of errors)."""
    logits = torch.tensor([2.0, 0.5, -1.0, 0.0, 1.2])
    p = torch.softmax(logits.double(), -1).numpy()
    g = torch.Generator().manual_seed(0)
    draws = 6000
    noise = torch.cat([_gumbel([g] * 50, 5) for _ in range(draws // 50)])
    counts = np.bincount((logits + noise).argmax(-1).numpy(), minlength=5)
    se = np.sqrt(p * (1 - p) / draws)
    assert np.all(np.abs(counts / draws - p) < 4.5 * se), (counts / draws, p)


def test_the_start_token_is_the_bos_and_its_absence_is_an_error():
    tok = types.SimpleNamespace(bos_token_id=7, eos_token_id=2)
    model = types.SimpleNamespace(config=types.SimpleNamespace(bos_token_id=1, eos_token_id=[3, 4], vocab_size=10))
    assert start_token(model, tok) == 7
    assert start_token(model, types.SimpleNamespace(bos_token_id=None)) == 1
    assert start_token(types.SimpleNamespace(config=types.SimpleNamespace(bos_token_id=None, eos_token_id=[3, 4]))) == 3
    with pytest.raises(ValueError, match="no BOS or EOS token.*--fit-windows"):
        start_token(types.SimpleNamespace(config=types.SimpleNamespace()), None)
    # an id the embedding does not have is skipped: a tiny GPT-2 names 50256 with 97 embeddings
    gpt2 = tiny_model("gpt2", layers=1)
    assert gpt2.config.bos_token_id == 50256 and gpt2.get_input_embeddings().num_embeddings == 97
    with pytest.raises(ValueError, match="no BOS or EOS token"):
        start_token(gpt2)
    assert start_token(gpt2, types.SimpleNamespace(bos_token_id=5)) == 5


def test_the_setting_resolves_to_the_default_only_where_it_can_be_used():
    kw = dict(loss_kind="next_token_ce", calib_windows=16, compensation_blocked_by=None)
    assert SearchSettings().resolved(**kw).self_fit_windows == DEFAULT_SELF_FIT_WINDOWS == 16
    assert SearchSettings(self_fit_windows=3).resolved(**kw).self_fit_windows == 3
    assert SearchSettings(self_fit_windows=0).resolved(**kw).self_fit_windows == 0
    assert SearchSettings(compensate=False).resolved(**kw).self_fit_windows == 0
    assert SearchSettings().resolved(**kw, search=False).self_fit_windows == 0
    assert SearchSettings().resolved(**kw, sampling_blocked_by="lazy").self_fit_windows == 0
    assert SearchSettings().resolved(**{**kw, "compensation_blocked_by": "no MLP"}).self_fit_windows == 0
    with pytest.raises(ValueError, match="self_fit_windows: sampled fit windows only feed compensation, which is off"):
        SearchSettings(compensate=False, self_fit_windows=2).resolved(**kw)
    with pytest.raises(ValueError, match="self_fit_windows: the model cannot sample.*lazy.*--fit-windows"):
        SearchSettings(self_fit_windows=2).resolved(**kw, sampling_blocked_by="lazy")
    with pytest.raises(ValueError, match="self_fit_windows: expected a non-negative int"):
        SearchSettings(self_fit_windows=-1)
    # sampled windows are fit data: with them, folds=1 over every window still has something to fit on
    SearchSettings(verify_windows=4, folds=1, self_fit_windows=2).resolved(**{**kw, "calib_windows": 4})
