"""Budget arithmetic over every small segment layout, selection, and the JSON plan's round trip/validation."""
from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction

import numpy as np
import pytest

from sglp_fast.plan import Plan, build_plan, config_fingerprint, resolve_budget
from sglp_fast.selection.frame import protected_blocks, select_removed, split_budget


def layouts(L):
    """Every way to cut 0..L-1 into contiguous segments (2^(L-1) of them)."""
    for cuts in itertools.product([False, True], repeat=L - 1):
        segs, start = [], 0
        for i, cut in enumerate(cuts):
            if cut:
                segs.append((start, i))
                start = i + 1
        segs.append((start, L - 1))
        yield segs


def hamilton(total, sizes):
    """Reference largest-remainder apportionment with exact fractions (ties to the lower index)."""
    quotas = [Fraction(total * s, sum(sizes)) for s in sizes]
    alloc = [math.floor(q) for q in quotas]
    order = sorted(range(len(sizes)), key=lambda i: (-(quotas[i] - alloc[i]), i))
    for i in order[: total - sum(alloc)]:
        alloc[i] += 1
    return alloc


@pytest.mark.parametrize("L", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("allow_empty", [False, True])
@pytest.mark.parametrize("protect", [(0, 0), (1, 0), (1, 2)])
def test_split_budget_every_layout_and_budget(L, allow_empty, protect):
    protected = protected_blocks(L, *protect)
    for segs in layouts(L):
        sizes = [b - a + 1 for a, b in segs]
        caps = [min(sum(1 for i in range(a, b + 1) if i not in protected), s - (0 if allow_empty else 1))
                for (a, b), s in zip(segs, sizes)]
        for remove in range(0, L):
            if remove > sum(caps):
                with pytest.raises(ValueError, match="do not fit"):
                    split_budget(segs, remove, protected=protected, allow_empty_segments=allow_empty)
                continue
            alloc = split_budget(segs, remove, protected=protected, allow_empty_segments=allow_empty)
            assert sum(alloc) == remove
            assert all(0 <= a <= c for a, c in zip(alloc, caps)), (segs, remove, alloc, caps)
            ham = hamilton(remove, sizes)
            if all(h <= c for h, c in zip(ham, caps)):
                assert alloc == ham, (segs, remove)  # no cap binds: plain largest remainders
            # redistribution only adds: no segment gets less than its capped floor quota
            for a, c, s in zip(alloc, caps, sizes):
                assert a >= min(c, remove * s // L)
            removed = select_removed(segs, list(np.random.default_rng(remove).random(L)), alloc, protected)
            assert len(removed) == remove and not set(removed) & protected
            if not allow_empty:  # never empties a segment
                for a, b in segs:
                    assert any(i not in removed for i in range(a, b + 1))


def test_split_budget_hand_examples():
    assert split_budget([(0, 9), (10, 19), (20, 29)], 8) == [3, 3, 2]  # equal remainders: lower index first
    assert split_budget([(0, 0), (1, 29)], 8) == [0, 8]
    assert split_budget([(0, 1), (2, 29)], 20) == [1, 19]
    # a full segment's share moves to the others: [0,1] can give 1, quota 2.0 -> 1 goes to the big segment
    assert split_budget([(0, 3), (4, 5), (6, 7)], 4) == [2, 1, 1]
    assert split_budget([(0, 1), (2, 3)], 3, allow_empty_segments=True) == [2, 1]
    assert split_budget([(0, 29)], 29) == [29]
    assert split_budget([(0, 29)], 0) == [0]
    with pytest.raises(ValueError, match="allow empty segments"):
        split_budget([(0, 14), (15, 29)], 29)
    assert split_budget([(0, 14), (15, 29)], 29, allow_empty_segments=True) in ([15, 14], [14, 15])


def test_select_removed_lowest_scores_and_ties():
    scores = [5.0, 1.0, 1.0, 0.5, 9.0, 0.1]
    assert select_removed([(0, 2), (3, 5)], scores, [2, 1]) == [1, 2, 5]
    assert select_removed([(0, 2), (3, 5)], scores, [1, 2], protected={5}) == [1, 3, 4]
    assert select_removed([(0, 5)], [1.0] * 6, [2]) == [0, 1]  # ties: lower index first


def test_resolve_budget_rules():
    assert resolve_budget(30, remove=0) == 0
    assert resolve_budget(30, remove=29) == 29
    assert resolve_budget(30, ratio=0.25) == 8  # floor(7.5 + 0.5)
    assert resolve_budget(30, ratio=0.2) == 6
    assert resolve_budget(30, ratio=0.0) == 0
    # params: 25% of 135 params with blocks of 3.5 params -> floor(9.64 + .5) = 10
    assert resolve_budget(30, ratio=0.25, ratio_of="params", total_params=135, block_params=[3.5] * 30) == 10
    for bad in (dict(remove=30), dict(remove=-1), dict(remove=2.0), dict(ratio=1.0), dict(ratio=-0.1),
                dict(remove=1, ratio=0.1), {}, dict(ratio=0.99)):
        with pytest.raises(ValueError):
            resolve_budget(30, **bad)
    with pytest.raises(ValueError, match="ratio_of"):
        resolve_budget(30, ratio=0.1, ratio_of="flops")
    with pytest.raises(ValueError, match="total_params"):
        resolve_budget(30, ratio=0.1, ratio_of="params")


def test_protected_blocks():
    assert protected_blocks(6, 1, 2) == {0, 4, 5}
    assert protected_blocks(3, 5, 5) == {0, 1, 2}
    with pytest.raises(ValueError, match="protect_first"):
        protected_blocks(6, -1, 0)


def _plan(L=6, remove=2, seed=0, **kw):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((L, L))
    cka = x @ x.T
    return build_plan(model_info={"id": "tiny", "architecture": "LlamaForCausalLM", "num_blocks": L,
                                  "config_hash": "sha256:" + "0" * 64},
                      calibration={"source": "builtin", "n_seqs": 2, "seq_len": 8, "tokens": 16, "seed": seed},
                      cka=cka, segments=[(0, 2), (3, L - 1)], k=2, k_rule="given", scorer="gradnorm",
                      scores={"gradnorm": rng.random(L).tolist(), "random": rng.random(L).tolist()},
                      remove=remove, budget_info={"ratio": None}, **kw)


def test_plan_round_trip(tmp_path):
    plan = _plan()
    path = tmp_path / "plan.json"
    plan.save(path)
    back = Plan.load(path)
    assert back.to_dict() == plan.to_dict()
    assert back.removed == plan.removed and len(back.removed) == 2
    d = json.loads(path.read_text())
    for key in ("cka", "segments", "k", "scores", "removed", "budget", "schema_version", "package_version",
                "model", "calibration"):
        assert key in d
    assert np.asarray(d["cka"]).shape == (6, 6)
    assert Plan.load(tmp_path).removed == plan.removed  # a directory means its plan.json
    analysis_only = _plan(remove=None)
    assert "removed" not in analysis_only.to_dict()
    assert Plan.from_dict(analysis_only.to_dict()).removed is None


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("cka"), "missing key 'cka'"),
    (lambda d: d.__setitem__("schema_version", 99), "schema_version 99"),
    (lambda d: d.__setitem__("format", "other"), "not an SGLP plan"),
    (lambda d: d["cka"].pop(), "6x6"),
    (lambda d: d.__setitem__("segments", [[0, 2], [4, 5]]), "contiguous"),
    (lambda d: d.__setitem__("segments", [[0, 2]]), "cover blocks"),
    (lambda d: d.__setitem__("k", 3), "k=3"),
    (lambda d: d["scores"]["gradnorm"].pop(), "scores\\['gradnorm'\\]"),
    (lambda d: d.__setitem__("removed", [3, 1]), "sorted unique"),
    (lambda d: d.__setitem__("removed", [0, 1, 2, 3, 4, 5]), "at least one block"),
    (lambda d: d.__setitem__("removed", [7]), "sorted unique"),
    (lambda d: d.pop("budget"), "together"),
    (lambda d: d.__setitem__("scorer", "taylor"), "needs the scores 'taylor'"),
    (lambda d: d.__setitem__("k", "2"), "'k' must be int"),
    (lambda d: d["model"].pop("config_hash"), "config_hash"),
])
def test_plan_refuses_corruption(mutate, message):
    d = json.loads(_plan().to_json())
    mutate(d)
    with pytest.raises(ValueError, match=message):
        Plan.from_dict(d)


def test_plan_refuses_bad_json(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(_plan().to_json()[:-40])
    with pytest.raises(ValueError, match="not valid JSON"):
        Plan.load(path)
    with pytest.raises(ValueError, match="no such file"):
        Plan.load(tmp_path / "missing.json")


def test_build_plan_checks_scorer():
    with pytest.raises(ValueError, match="has no scores"):
        build_plan(
            model_info={"id": "x", "num_blocks": 2, "config_hash": "h"}, calibration={}, cka=np.eye(2),
            segments=[(0, 1)], k=1, k_rule="given", scorer="taylor", scores={"gradnorm": [1.0, 2.0]}, remove=1)


def test_config_fingerprint_ignores_load_time_keys():
    from transformers import LlamaConfig

    a = LlamaConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4)
    b = LlamaConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4)
    b._name_or_path = "/somewhere/else"
    b.torch_dtype = "bfloat16"
    assert config_fingerprint(a) == config_fingerprint(b)
    c = LlamaConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=4)
    assert config_fingerprint(a) != config_fingerprint(c)
