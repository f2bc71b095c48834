"""Scorers on synthetic calibration results, and the baselines against brute-force float64 references."""
from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sglp_fast.selection import baselines
from sglp_fast.compare import markdown_table, CompareRow
from sglp_fast.selection.scores import SCORERS, compute_scores, get_scorer


def _result(L=7, seed=0, gradients=True):
    rng = np.random.default_rng(seed)
    return SimpleNamespace(num_blocks=L, grad_norm=rng.random(L) if gradients else None,
                           taylor=rng.random(L) if gradients else None, block_influence=rng.random(L),
                           relative_update=rng.random(L))


def test_scorers_read_the_right_fields():
    r = _result()
    s = compute_scores(r, seed=3)
    assert set(s) == {"gradnorm", "taylor", "block_influence", "relative_update", "random"}
    np.testing.assert_array_equal(s["gradnorm"], r.grad_norm)
    np.testing.assert_array_equal(s["taylor"], r.taylor)
    np.testing.assert_array_equal(s["block_influence"], r.block_influence)
    np.testing.assert_array_equal(s["relative_update"], r.relative_update)
    assert s["random"] == compute_scores(r, ["random"], seed=3)["random"]  # seeded: reproducible
    assert s["random"] != compute_scores(r, ["random"], seed=4)["random"]


def test_scorers_without_gradients_are_skipped_not_faked():
    s = compute_scores(_result(gradients=False))
    assert set(s) == {"block_influence", "relative_update", "random"}
    with pytest.raises(ValueError, match="gradients=True"):
        get_scorer("gradnorm")(_result(gradients=False))


def test_scorer_errors():
    with pytest.raises(ValueError, match="expected one of"):
        get_scorer("magnitude")
    r = _result()
    r.grad_norm = np.array([1.0, np.nan, 2.0, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="non-finite scores for blocks \\[1\\]"):
        SCORERS["gradnorm"](r)
    r.grad_norm = np.ones(3)
    with pytest.raises(ValueError, match="expected 7 scores"):
        SCORERS["gradnorm"](r)


def _angular_brute(h, n):
    """Reference: loop over every start and every sequence in float64."""
    L = h.shape[0] - 1
    best, best_d = None, np.inf
    for l in range(L - n + 1):
        ds = []
        for s in range(h.shape[1]):
            a, b = h[l, s], h[l + n, s]
            c = float(a @ b / np.sqrt((a @ a) * (b @ b)))
            ds.append(np.arccos(min(1.0, max(-1.0, c))) / np.pi)
        d = float(np.mean(ds))
        if d < best_d - 1e-15:
            best, best_d = l, d
    return list(range(best, best + n))


@pytest.mark.parametrize("L, seqs, d", [(5, 1, 3), (9, 4, 17), (12, 3, 1)])
def test_angular_contiguous_matches_brute_force(L, seqs, d):
    rng = np.random.default_rng(L * 100 + d)
    h = rng.standard_normal((L + 1, seqs, d))
    for n in range(0, L):
        got = baselines.angular_contiguous(h, n)
        assert got == ([] if n == 0 else _angular_brute(h, n))


def test_angular_finds_the_planted_redundant_run():
    rng = np.random.default_rng(0)
    h = rng.standard_normal((11, 4, 16))
    h[6] = h[4] * 3.0  # blocks 4 and 5 turn h(4) into a scaled copy: angular distance 0
    assert baselines.angular_contiguous(h, 2) == [4, 5]
    d = baselines.angular_distances(h, 2)
    assert d.shape == (9,) and d[4] == pytest.approx(0.0, abs=1e-7)


def test_shortgpt_last_random():
    bi = [0.5, 0.1, 0.3, 0.1, 0.9]
    assert baselines.shortgpt(bi, 2) == [1, 3]
    assert baselines.shortgpt(bi, 0) == []
    for n in range(5):  # brute force: the n-subset with the least total, lower indices on ties
        best = min(itertools.combinations(range(5), n), key=lambda c: (sum(bi[i] for i in c), c))
        assert baselines.shortgpt(bi, n) == list(best)
    assert baselines.last_blocks(6, 2) == [4, 5]
    r = baselines.random_blocks(30, 8, seed=1)
    assert r == baselines.random_blocks(30, 8, seed=1) and len(set(r)) == 8 and r == sorted(r)
    assert r != baselines.random_blocks(30, 8, seed=2)
    for bad in (-1, 5, 1.5):
        with pytest.raises(ValueError, match="n: expected"):
            baselines.shortgpt(bi, bad)


def test_last_token_observer_uses_the_mask():
    obs = baselines.LastTokenObserver()
    x_in = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])  # right padding in row 0
    for layer in range(2):
        obs.observe(layer, x_in + layer, x_in + layer + 1, 0, mask)
        obs.observe(layer, x_in[:1] + 10 * layer, x_in[:1] + 10 * layer + 1, 1, None)
    h = obs.hidden_states()
    assert h.shape == (3, 3, 3)
    np.testing.assert_array_equal(h[0, 0], x_in[0, 1].numpy())  # last valid token of row 0
    np.testing.assert_array_equal(h[0, 1], x_in[1, 3].numpy())
    np.testing.assert_array_equal(h[0, 2], x_in[0, 3].numpy())  # no mask: position -1
    np.testing.assert_array_equal(h[2, 0], (x_in[0, 1] + 2).numpy())  # output of the last block
    with pytest.raises(ValueError, match="nothing observed"):
        baselines.LastTokenObserver().hidden_states()


def test_markdown_table_marks_the_best():
    rows = [CompareRow("a", 1, (0,), 10.0), CompareRow("b", 1, (1,), 9.0), CompareRow("a", 2, (0, 1), 20.0),
            CompareRow("b", 2, (1, 2), 30.0)]
    t = markdown_table(8.0, rows).splitlines()
    assert t[2] == "| a | 10.00 | **20.00** |" and t[3] == "| b | **9.00** | 30.00 |"
    assert t[4] == "| (unpruned) | 8.00 | 8.00 |"
