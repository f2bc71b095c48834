"""Structure recovery: planted blocks in a CKA-like similarity matrix come back as the segments, and
k="auto" (kneedle) finds their number."""
from __future__ import annotations

import numpy as np
import pytest

from sglp_fast.segmentation.fisher import fisher_segment, knee_k


def planted_similarity(sizes, rng, within=0.85, between=0.25, noise=0.03):
    """Symmetric L×L 'CKA' matrix: high inside planted blocks of consecutive layers, low across, plus noise."""
    labels = np.repeat(np.arange(len(sizes)), sizes)
    sim = np.where(labels[:, None] == labels[None, :], within, between)
    sim = sim + noise * rng.standard_normal(sim.shape)
    sim = (sim + sim.T) / 2
    np.fill_diagonal(sim, 1.0)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return sim, [(int(a), int(a + s - 1)) for a, s in zip(starts, sizes)]


@pytest.mark.parametrize("impl", ["cpp", "numpy"])
@pytest.mark.parametrize("seed,sizes", [(0, [5, 9, 7, 9]), (1, [3, 12, 4, 6, 7]), (2, [20, 12]), (3, [8] * 10)])
def test_planted_blocks_are_recovered(impl, seed, sizes):
    rng = np.random.default_rng(seed)
    sim, blocks = planted_similarity(sizes, rng)
    given = fisher_segment(sim, k=len(sizes), impl=impl)
    assert given.segments == blocks
    auto = fisher_segment(sim, k="auto", impl=impl)
    assert auto.k_rule == "kneedle"
    assert auto.k == len(sizes) and auto.segments == blocks
    assert auto.k_max >= len(sizes)


def test_auto_k_max_default_and_override():
    rng = np.random.default_rng(5)
    sim, _ = planted_similarity([10, 10, 10], rng)
    seg = fisher_segment(sim, k="auto")
    assert seg.k_max == min(30, max(2, 2 * int(np.ceil(np.sqrt(30)))))  # 12 for 30 layers
    assert fisher_segment(sim, k="auto", k_max=6).k_max == 6
    assert fisher_segment(sim, k="auto", min_size=4).k_max == 7  # bounded by L // min_size


def test_knee_rule_on_constructed_curves():
    assert knee_k([10.0, 5.0, 1.0, 0.9, 0.8, 0.7]) == 3  # sharp knee at k=3
    assert knee_k([100.0, 10.0, 9.0, 8.5, 8.0]) == 2
    assert knee_k([5.0, 4.0, 3.0, 2.0, 1.0]) == 1  # a straight line has no knee
    assert knee_k([5.0, 5.0, 5.0]) == 1  # flat: no structure
    assert knee_k([3.0, 1.0]) == 1  # two candidates cannot show a knee
    assert knee_k([7.0]) == 1
    # exact tie (normalized depths 0.25 at k=2 and k=3): the smaller k wins
    assert knee_k([8.0, 4.0, 2.0, 1.0, 0.0]) == 2
    assert knee_k([8.0, 4.5, 2.0, 1.0, 0.0]) == 3
