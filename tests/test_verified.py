"""The default plan: SkipVerifier (loss of a model with blocks skipped), compensation, and the verified search.

Numeric paths are checked in float64 against references written independently of sglp_fast: the loss of
a deep copy with the blocks really removed (``reference_loss``), and the compensation maps solved with
numpy from activations recorded by forward hooks.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import types

import numpy as np
import pytest
import torch
from tiny_models import VOCAB, reference_loss, tiny_batches, tiny_model

from sglp_fast.calibration.runtime import calibrate
from sglp_fast.selection import regularization as R
from sglp_fast.selection.compensation import apply_transforms, fold_state_tensor, folded, module_kind, runs_of
from sglp_fast.models import get_adapter
from sglp_fast.selection.verified import (CANDIDATES, fits_frame, one_standard_error_pick, verified_pick,
                                          within_one_se)
from sglp_fast.selection.verifier import SkipVerifier

torch.set_grad_enabled(True)


def _batches(seed: int, shapes=((1, 9), (2, 7), (1, 3), (2, 8), (1, 6))):
    """Windows of awkward lengths (one of 3 tokens), the 2-window batches with a left-padded row."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b, s in shapes:
        batch = {"input_ids": torch.randint(0, VOCAB, (b, s), generator=g)}
        if b > 1:
            mask = torch.ones(b, s, dtype=torch.long)
            mask[0, :2] = 0
            batch["attention_mask"] = mask
        out.append(batch)
    return out


def _pruned(model, removed, transforms=None):
    copy_ = copy.deepcopy(model)
    adapter = get_adapter(copy_)
    if transforms:
        apply_transforms(adapter, transforms)
    adapter.remove_blocks(sorted(removed))
    return copy_


def _reference(model, removed, batches, transforms=None) -> float:
    with torch.no_grad():
        return float(reference_loss(_pruned(model, removed, transforms), "llama", batches)[0])


def _verifier(model, batches, verify_windows, keep_all=False, **kw):
    """calibrate() keeps the block inputs (of every window, or of the check windows only); the selection
    stage builds its verifier from that handle."""
    keep = sum(int(b["input_ids"].shape[0]) for b in batches) if keep_all else verify_windows
    res = calibrate(model, batches, gradients=False, progress=False, keep_inputs=keep, **kw)
    return SkipVerifier(res.kept_inputs, verify_windows)


def _seeds(n, seed=0):
    """Seeds for tiny models and batches from a local generator (the global RNG is neither read nor reset)."""
    return [int(x) for x in np.random.default_rng(seed).integers(0, 10**6, n)]


@pytest.fixture(scope="module")
def setup():
    model_seed, batch_seed = _seeds(2)
    model = tiny_model("llama", layers=6, seed=model_seed).double()
    batches = _batches(seed=batch_seed)
    ver = _verifier(model, batches, 3, keep_all=True)
    yield model, batches, ver
    ver.close()


@pytest.mark.parametrize("removed", [(), (0,), (5,), (1, 2, 4), (0, 1, 2, 3, 4)])
def test_verifier_loss_equals_the_pruned_model(setup, removed):
    model, batches, ver = setup
    # keep_inputs=3 windows -> the first two batches (1 + 2 windows)
    # 2 check batches, so 2 folds (of 4 asked: no empty ones), slot 2 = the rest, never held out
    assert ver.num_windows == 3 and ver.folds == 2 and ver.fold_of_batch == [0, 1, 2, 2, 2]
    got = ver.loss(removed)
    want = _reference(model, removed, batches[:2])
    assert abs(got - want) <= 1e-10 * max(1.0, abs(want)), (removed, got, want)
    # per check batch: each batch's own mean loss (the reference on that batch alone)
    per = ver.batch_losses([removed])[0]
    assert len(per) == 2
    for b, value in enumerate(per):
        ref = _reference(model, removed, batches[b:b + 1])
        assert abs(value - ref) <= 1e-10 * max(1.0, abs(ref)), (removed, b, value, ref)


@pytest.mark.parametrize("removed", [(0,), (1, 2), (3,)])
def test_headless_encoder_is_judged_by_embedding_distortion(removed):
    """BERT without a head: the search's loss is mean 1 - cos(pooled, dense pooled), not the energy proxy."""
    model_seed, batch_seed = _seeds(2, seed=len(removed))
    model = tiny_model("bert", layers=4, seed=model_seed).double().eval()
    batches = tiny_batches("bert", seed=batch_seed, shapes=((1, 17), (3, 5), (2, 9), (1, 2)))
    ver = _verifier(model, batches, 7)  # every window
    try:
        got = ver.loss(removed)
        assert ver.loss(()) == pytest.approx(0.0, abs=1e-12)  # the dense model is not distorted
    finally:
        ver.close()
    pruned = _pruned(model, removed)

    def pooled(m, batch):
        with torch.no_grad():
            h = m(**batch).last_hidden_state
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
        return [h[i][mask[i]].mean(0) for i in range(h.shape[0])]

    dist = [1 - torch.nn.functional.cosine_similarity(a, b, dim=0)
            for batch in batches for a, b in zip(pooled(pruned, batch), pooled(model, batch))]
    want = float(sum(dist) / len(dist))
    assert want > 1e-6 and abs(got - want) <= 1e-10 * max(1.0, abs(want)), (got, want)


def test_verifier_work_counter_and_memo(setup):
    _, _, ver = setup
    before = ver.window_block_forwards
    ver.loss([5])  # starts at block 5, which is skipped: no block runs
    assert ver.window_block_forwards == before
    ver.loss([1, 3])  # blocks 2, 4, 5 on 3 windows
    assert ver.window_block_forwards - before == 3 * 3
    ver.loss([3, 1])  # memoized
    assert ver.window_block_forwards - before == 3 * 3
    assert ver.block_forwards == ver.window_block_forwards / 7  # 7 calibration windows in all


def test_plans_sharing_a_prefix_compute_it_once_and_give_the_same_losses():
    """The greedy's candidates (base + one block) share base's stream up to the block they add: one call
    runs each distinct prefix once, bit-identical to checking each plan in its own call."""
    model = tiny_model("llama", layers=7, seed=12).double()
    batches = _batches(13)
    alone = _verifier(model, batches, 3)
    shared = _verifier(model, batches, 3)
    try:
        base = [2, 5]
        cands = [[*base, l] for l in (0, 1, 3, 4, 6)]
        want = [alone.losses([c])[0] for c in cands]
        before = shared.window_block_forwards
        got = shared.losses(cands)
        assert got == want  # bit for bit: the same block calls on the same tensors
        # block runs per check window (3 windows): +0 runs 1 3 4 6 from block 0's cached input; +1 runs 3 4 6
        # from block 1's; from block 2's: +3 runs 4 6, +4 runs 3 6, +6 runs 3 4, the run of 3 shared: 5
        runs = 4 + 3 + 5
        assert shared.window_block_forwards - before == 3 * runs
        assert alone.window_block_forwards > shared.window_block_forwards
        for plan, value in zip(cands, got):
            assert value == pytest.approx(_reference(model, plan, batches[:2]), rel=1e-12)
    finally:
        alone.close()
        shared.close()


def test_verifier_refuses_bad_plans_and_use_after_close():
    model = tiny_model("llama", layers=3, seed=3).double()
    ver = _verifier(model, _batches(4), 1)
    assert ver.fold_of_batch == [0]  # only the check windows were kept
    with pytest.raises(ValueError, match="leaving at least one block"):
        ver.loss([0, 1, 2])
    with pytest.raises(ValueError, match=r"in \[0, 2\]"):
        ver.loss([3])
    ver.close()
    with pytest.raises(ValueError, match="closed"):
        ver.loss([1])


def test_disk_offloaded_verifier_equals_in_memory(tmp_path):
    model = tiny_model("llama", layers=4, seed=5).double()
    batches = _batches(6)
    fast = _verifier(model, batches, 2)
    disk = _verifier(model, batches, 2, max_cpu_memory=0, offload_dir=tmp_path)
    try:
        for removed in ([1], [0, 2], [3]):
            assert fast.loss(removed) == disk.loss(removed)
    finally:
        fast.close()
        disk.close()


# ------------------------------------------------------------------------------------------- compensation
def _hooked_run(model, batches, stop_after: int):
    """Per batch: block stop_after's MLP output and block output, and the dense inputs of every block."""
    blocks = get_adapter(model).blocks
    rec = {"mlp": [], "out": [], "ins": [[] for _ in range(len(blocks) + 1)]}
    hooks = [blocks[stop_after].mlp.down_proj.register_forward_hook(lambda m, a, o: rec["mlp"].append(o)),
             blocks[stop_after].register_forward_hook(lambda m, a, o: rec["out"].append(o[0] if isinstance(o, tuple) else o))]
    hooks += [blk.register_forward_hook(lambda m, a, o, l=l: rec["ins"][l + 1].append(o[0] if isinstance(o, tuple) else o))
              for l, blk in enumerate(blocks)]
    with torch.no_grad():
        for batch in batches:
            model(**batch, use_cache=False)
    for h in hooks:
        h.remove()
    return rec


def _numpy_rows(model, fit, stop_after: int, target: list[np.ndarray], weighted: bool = True):
    """X, Y of one run's least-squares problem, from activations recorded on ``model`` (numpy, float64)."""
    rec = _hooked_run(model, fit, stop_after=stop_after)
    X, Y = [], []
    for b, batch in enumerate(fit):
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
        m = rec["mlp"][b][mask].numpy()
        h_mid = rec["out"][b][mask].numpy() - m
        need = target[b][mask.numpy()] - h_mid
        w = 1.0 / np.linalg.norm(need, axis=1, keepdims=True) if weighted else 1.0
        X.append(m * w)
        Y.append((need - m) * w)
    return np.concatenate(X), np.concatenate(Y)


def _numpy_ridge(X, Y, alpha: float = 1.0) -> np.ndarray:
    G = X.T @ X
    D = np.linalg.solve(G + alpha * np.trace(G) / G.shape[0] * np.eye(G.shape[0]), X.T @ Y)
    return np.eye(D.shape[0]) + D


def _run_rows(model, batches, removed, weighted: bool = True):
    """The rows of run removed = a..b (one run) per batch, numpy."""
    (a, b), = runs_of(removed)
    dense = [x.numpy() for x in _hooked_run(model, batches, stop_after=a - 1)["ins"][b + 1]]
    return [_numpy_rows(model, [bt], a - 1, [dense[i]], weighted) for i, bt in enumerate(batches)]


@pytest.mark.parametrize("policy", ["cv", "fixed"])
def test_run_statistics_equal_numpy_per_fold(setup, policy):
    """XᵀX, XᵀY and tr(YᵀY) of run 2..3 per fold: check batches 0 and 1 are folds 0 and 1, the rest trains.
    The default's rows unweighted (round 8), the fixed policy's weighted by 1/||target||."""
    from sglp_fast.selection import regularization as R

    model, batches, ver = setup
    weighted = R.get_policy(policy).weighted
    assert weighted == (policy == "fixed")
    ver.prepare([[2, 3]], policy=policy)
    st = ver._stats[(2, 3), weighted]
    rows = _run_rows(model, batches, [2, 3], weighted)
    assert st.gram.shape[0] == 3  # folds 0 and 1, and the never-held-out slot: no empty fold is kept
    for slot, members in {0: [0], 1: [1], 2: [2, 3, 4]}.items():
        X = np.concatenate([rows[i][0] for i in members]) if members else np.zeros((0, 32))
        Y = np.concatenate([rows[i][1] for i in members]) if members else np.zeros((0, 32))
        np.testing.assert_allclose(st.gram[slot].numpy(), X.T @ X, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(st.cross[slot].numpy(), X.T @ Y, rtol=1e-10, atol=1e-12)
        assert float(st.energy[slot]) == pytest.approx(float((Y * Y).sum()), rel=1e-10, abs=1e-12)
        assert int(st.tokens[slot]) == X.shape[0]


def test_statistics_summed_on_the_device_per_slot_equal_the_in_place_sums(setup, monkeypatch):
    """The GPU path of run_statistics.accumulate (each run's sums kept where the rows are and copied to the
    statistics once per slot, the runs of one block one at a time, the block re-run for each), forced here
    on the CPU: the same statistics as the in-place path (the CPU's) for two runs after one block, which
    test_run_statistics_equal_numpy_per_fold checks against numpy; each extra run costs one more pass."""
    from sglp_fast.selection import run_statistics

    model, batches, ver = setup
    runs = [(2, 3), (2, 4)]
    got, work = {}, {}
    for in_place in (True, False):
        monkeypatch.setattr(run_statistics, "_sums_in_place", lambda block, stats, v=in_place: v)
        before = ver.window_block_forwards
        with torch.no_grad():
            got[in_place] = run_statistics.accumulate(ver, runs, ver.fold_of_batch, ver.folds, check=False)
        work[in_place] = ver.window_block_forwards - before
    assert work[False] == 2 * work[True] > 0
    for run in runs:
        a, b = got[True][run], got[False][run]
        for name in ("gram", "cross", "energy"):
            torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-12, atol=1e-12)
        assert torch.equal(a.tokens, b.tokens) and int(a.tokens.sum()) > 0
        assert all(float(a.gram[s].abs().sum()) > 0 for s in range(a.gram.shape[0]))  # every slot got rows
    ver.prepare([[2, 3]], policy="fixed")  # accumulate's default rows are weighted, as the fixed policy's
    torch.testing.assert_close(got[False][(2, 3)].gram, ver._stats[(2, 3), True].gram, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fold", [None, 0, 1])
def test_fixed_policy_map_equals_numpy_ridge(setup, fold):
    """The wave-1 rule (ridge 1 x tr/d, no shrink) on every window, or on every window but one fold's."""
    model, batches, ver = setup
    rows = _run_rows(model, batches, [2, 3])
    use = [i for i in range(len(batches)) if fold is None or ver.fold_of_batch[i] != fold]
    X, Y = (np.concatenate([rows[i][k] for i in use]) for k in (0, 1))
    T = ver.transforms([2, 3], fold=fold, policy="fixed")
    assert list(T) == [1]
    np.testing.assert_allclose(T[1].numpy(), _numpy_ridge(X, Y, 1.0), rtol=1e-8, atol=1e-10)


def test_replaceme_policy_is_the_unweighted_least_squares_map(setup):
    model, batches, ver = setup
    rows = [_numpy_rows(model, [bt], 1, [x]) for bt, x in zip(batches, [
        x.numpy() for x in _hooked_run(model, batches, stop_after=1)["ins"][4]])]
    Xw = np.concatenate([r[0] for r in rows])
    # unweighted rows: recompute without w
    X, Y = _numpy_rows(model, batches, 1, [x.numpy() for x in _hooked_run(model, batches, 1)["ins"][4]],
                       weighted=False)
    T = ver.transforms([2, 3], policy="replaceme")[1].numpy()
    want = np.eye(32) + np.linalg.lstsq(X, Y, rcond=None)[0]
    np.testing.assert_allclose(T, want, rtol=1e-6, atol=1e-8)
    assert not np.allclose(Xw, X)  # the weighted policies' rows (fixed, cv-weighted) differ from ReplaceMe's


def test_cross_validated_choice_equals_brute_force(setup):
    """The closed-form ridge path + shrinkage equals solving every fold's map and scoring it directly."""
    from sglp_fast.selection import regularization as R

    model, batches, ver = setup
    ver.prepare([[2, 3]])
    st = ver._stats[(2, 3), R.CV.weighted]
    folds = [0, 1]
    best = None
    for alpha in R.RIDGE_GRID:
        A = B = 0.0
        for f in folds:
            G, C = (x.numpy() for x in st.without(f))
            D = np.linalg.solve(G + alpha * np.trace(G) / 32 * np.eye(32), C)
            A += float(np.trace(D.T @ st.cross[f].numpy()))
            B += float(np.trace(D.T @ st.gram[f].numpy() @ D))
        shrink = min(max(A / B, 0.0), 1.0)
        gain = (2 * shrink * A - shrink ** 2 * B) / float(st.energy[folds].sum())
        if best is None or gain > best[2] or (gain == best[2] and alpha > best[0]):
            best = (alpha, shrink, gain)
    got = R.choose(st, R.CV, range(ver.folds))
    assert [a for a, _, _ in got.path] == list(R.RIDGE_GRID)
    assert max(got.path, key=lambda x: (x[2], x[0])) == pytest.approx(best, rel=1e-6)
    if got.has_map:  # the default halves the CV shrinkage (scale 0.5, chosen on another domain)
        assert (got.alpha, got.shrink) == pytest.approx((best[0], R.CV.scale * best[1]), rel=1e-6)
        T = R.fit(st, got)
        G, C = (x.numpy() for x in st.without(None))
        D = np.linalg.solve(G + got.alpha * np.trace(G) / 32 * np.eye(32), C)
        np.testing.assert_allclose(T.numpy(), np.eye(32) + got.shrink * D, rtol=1e-8, atol=1e-10)
    # nested: each fold scores the choice the other fold made
    honest = 0.0
    for f, other in ((0, 1), (1, 0)):
        Go, Co = (x.numpy() for x in st.without(other))
        opts = []
        for alpha in R.RIDGE_GRID:
            Do = np.linalg.solve(Go + alpha * np.trace(Go) / 32 * np.eye(32), Co)
            a_o, b_o = np.trace(Do.T @ st.cross[other].numpy()), np.trace(Do.T @ st.gram[other].numpy() @ Do)
            beta = min(max(a_o / b_o, 0.0), 1.0)
            opts.append((2 * beta * a_o - beta ** 2 * b_o, alpha, beta))
        _, alpha, beta = max(opts, key=lambda x: (x[0], x[1]))
        G, C = (x.numpy() for x in st.without(f))
        D = np.linalg.solve(G + alpha * np.trace(G) / 32 * np.eye(32), C)
        honest += 2 * beta * np.trace(D.T @ st.cross[f].numpy()) - beta ** 2 * np.trace(D.T @ st.gram[f].numpy() @ D)
    honest /= float(st.energy[folds].sum())
    assert got.cv_gain == pytest.approx(honest, rel=1e-6, abs=1e-12)
    assert got.has_map == (best[2] > 0 and honest > 0)


def test_cv_gives_noise_no_map_or_a_negligible_one_and_a_linear_signal_a_full_map():
    """Synthetic statistics (d=8, 4 folds x 40 rows): Y independent of X -> over 20 draws, most get no map
    and any map kept is negligible (nested gain < 1% of the error, ||T - I|| < 0.3, chance alone); Y = X D
    (plus tiny noise) -> a full map (shrink ~ 1, weak ridge) that recovers D."""
    from sglp_fast.selection import regularization as R
    from sglp_fast.selection.run_statistics import RunStatistics

    d, folds = 8, 4
    kept = 0
    for seed in _seeds(20, seed=7):
        g = torch.Generator().manual_seed(seed)
        noise = RunStatistics.zeros(folds, d)
        for f in range(folds):
            noise.add(f, torch.randn(40, d, generator=g, dtype=torch.float64),
                      torch.randn(40, d, generator=g, dtype=torch.float64))
        c = R.choose(noise, R.CV, range(folds))
        if c.has_map:
            kept += 1
            assert c.cv_gain < 0.01
            assert float((R.fit(noise, c) - torch.eye(d, dtype=torch.float64)).norm()) < 0.3
    assert kept <= 5
    g = torch.Generator().manual_seed(_seeds(1, seed=8)[0])
    D = torch.randn(d, d, generator=g, dtype=torch.float64)
    signal = RunStatistics.zeros(folds, d)
    for f in range(folds):
        X = torch.randn(40, d, generator=g, dtype=torch.float64)
        signal.add(f, X, X @ D + 1e-3 * torch.randn(40, d, generator=g, dtype=torch.float64))
    full = dataclasses.replace(R.CV, name="cv-full", scale=1.0)
    c = R.choose(signal, full, range(folds))
    assert c.has_map and c.shrink > 0.99 and c.alpha <= 1e-3 and c.cv_gain > 0.99
    torch.testing.assert_close(R.fit(signal, c), torch.eye(d, dtype=torch.float64) + D, rtol=1e-3, atol=1e-3)
    half = R.choose(signal, R.CV, range(folds))  # the default: the same map, halfway to the identity
    assert R.CV.scale == 0.5 and half.shrink == pytest.approx(0.5 * c.shrink) and half.alpha == c.alpha


@pytest.mark.parametrize("removed", [(2, 3), (1, 3, 4), (0, 2)])
def test_compensated_loss_is_cross_fitted_and_equals_the_folded_pruned_model(setup, removed):
    """Check batch b runs with the maps fitted without its fold: each batch's loss equals the reference
    model with those maps folded in."""
    model, batches, ver = setup
    maps = [a - 1 for a, _ in runs_of(removed) if a >= 1]  # a run at block 0 stays as is
    per = ver.batch_losses([removed], compensated=True, maps=[maps], policy="fixed")[0]
    for b in range(2):
        T = ver.transforms(removed, fold=ver.fold_of_batch[b], maps=maps, policy="fixed")
        assert sorted(T) == maps
        want = _reference(model, removed, batches[b:b + 1], T)
        assert abs(per[b] - want) <= 1e-10 * max(1.0, abs(want)), (b, per[b], want)
    if maps:  # compensation really changed the model that was checked
        assert ver.losses([removed], compensated=True, maps=[maps], policy="fixed")[0] != ver.loss(removed)


def test_each_block_is_read_once_per_round(setup):
    """Several plans, plain and compensated with per-fold maps, in one call: every block acquired once."""
    model, batches, _ = setup
    ver = _verifier(model, batches, 3, keep_all=True)
    kept = ver._kept
    counts: dict[int, int] = {}
    original = kept.block

    def counting(layer, next_layer=None):
        counts[layer] = counts.get(layer, 0) + 1
        return original(layer, next_layer)
    kept.block = counting
    try:
        plans = [[1, 2], [3], [2, 4]]
        ver.prepare(plans, policy="fixed")  # the statistics round: the blocks before the runs, once each
        assert counts == {0: 1, 1: 1, 2: 1, 3: 1}
        counts.clear()
        ver._memo.clear()
        ver.losses(plans + plans, compensated=False)
        ver.losses(plans, compensated=True, maps=[[0], [2], [1, 3]], policy="fixed")
        # one pass for the plain plans (blocks 3.. : 1 and 2 are removed or not yet reached by any), one for
        # the compensated ones (from block 0, the first map's block), every block once per pass
        assert counts == {0: 1, 1: 1, 2: 1, 3: 2, 4: 2, 5: 2}
    finally:
        kept.block = original
        ver.close()


def test_the_compensated_search_is_one_pass_after_the_statistics(setup):
    """verified_pick with compensation: the statistics pass, then ONE pass for the plain and cross-fitted
    variants of every candidate (plus one per elimination step, if a map had to be dropped); the saved
    model's loss (maps fitted on every window) is one more pass, for the kept plan only."""
    model, batches, _ = setup
    ver = _verifier(model, batches, 3, keep_all=True)
    ver.plain_checks = "all"  # "band" by default (the next test)
    passes = []
    run = ver._run
    ver._run = lambda plans, fixes: passes.append(len(plans)) or run(plans, fixes)
    try:
        r = [0.5, 0.1, 0.2, 0.3, 0.4, 0.6]
        hidden = np.random.default_rng(0).normal(size=(7, 3, 32))
        sel = verified_pick(segments=[(0, 2), (3, 5)], n=2, relative_update=r, block_influence=r, verifier=ver,
                            last_token_hidden=hidden, compensate=True, greedy=False)
        # an elimination step runs a pass unless every trial it makes leaves no map (the plain plan: memoized)
        steps = [(len(c.get("maps_dropped_by_check", [])), sum(m["kept"] for m in c.get("maps", {}).values()))
                 for c in sel.candidates.values()]
        rounds = sum(any(dropped >= s and kept + dropped >= s + 1 for dropped, kept in steps)
                     for s in range(1, 1 + max(d for d, _ in steps)))
        assert len(passes) == 1 + rounds, (passes, steps)
        ver.losses([sel.removed], compensated=True, all_windows=True, maps=[sel.maps])  # the saved model's loss
        if sel.compensated:  # one more pass, of one plan
            assert len(passes) == 2 + rounds and passes[-1] == 1
        else:  # a plain pick: its loss is memoized
            assert len(passes) == 1 + rounds
    finally:
        ver.close()


def test_band_checks_plain_only_off_the_band_and_picks_as_all():
    """plain_checks "band" (the default) against "all" on a real model, 4 random setups:
    the same pick, maps and compensated losses; a candidate checked plain has the same plain loss; one not
    checked plain has its compensated option out of one standard error of the lowest option (and some are);
    it takes no more block calls."""
    unchecked = 0
    for seed in range(4):
        unchecked += _band_against_all(seed)
    assert unchecked > 0


def _band_against_all(seed: int) -> int:
    model_seed, batch_seed = _seeds(2, seed=100 + seed)
    model = tiny_model("llama", layers=6, seed=model_seed).double()
    batches = _batches(seed=batch_seed, shapes=((1, 9), (1, 7), (1, 8), (1, 6), (1, 9), (1, 5), (1, 8)))
    r = np.random.default_rng(seed).random(6)
    hidden = np.random.default_rng(seed).normal(size=(7, 7, 16))
    kw = dict(segments=[(0, 2), (3, 5)], n=2, relative_update=r, block_influence=r[::-1].copy(),
              last_token_hidden=hidden, compensate=True, greedy=False, run_candidates=2)
    sel, work, unchecked = {}, {}, 0
    for mode in ("all", "band"):
        ver = _verifier(model, batches, 7, keep_all=True)
        assert ver.plain_checks == "band"  # the default
        with pytest.raises(ValueError, match="plain_checks: expected one of"):
            ver.plain_checks = "half"
        ver.plain_checks = mode
        try:
            sel[mode] = verified_pick(verifier=ver, **kw)
            work[mode] = ver.window_block_forwards
            if mode == "band":
                for name, c in sel[mode].candidates.items():
                    if c.get("calib_loss") is None and "skipped" not in c:
                        per = ver.batch_losses([c["removed"]], compensated=True,
                                               maps=[[int(p) for p, m in c["maps"].items() if m["kept"]]])[0]
                        low = sel[mode].lowest_loss
                        lname, lcomp = low.replace(" + compensation", ""), low.endswith("compensation")
                        lc = sel[mode].candidates[lname]
                        base = ver.batch_losses([lc["removed"]], compensated=lcomp,
                                                maps=[[int(p) for p, m in lc["maps"].items() if m["kept"]]
                                                      if lcomp else None])[0]
                        assert not within_one_se(np.asarray(per), np.asarray(base)), name
                        assert "not checked" in c["plain"]
                        unchecked += 1
        finally:
            ver.close()
    a, b = sel["all"], sel["band"]
    assert (a.removed, a.picked, a.compensated, a.maps, a.lowest_loss) == \
        (b.removed, b.picked, b.compensated, b.maps, b.lowest_loss)
    assert b.to_dict()["plain_checks"] == "band" and a.to_dict()["plain_checks"] == "all"
    for name, c in b.candidates.items():
        if "skipped" in c:
            continue
        if c["calib_loss"] is not None:
            assert c["calib_loss"] == pytest.approx(a.candidates[name]["calib_loss"], rel=1e-12)
        want = a.candidates[name]["calib_loss_compensated"]
        assert c["calib_loss_compensated"] == pytest.approx(want, rel=1e-12) \
            or a.candidates[name].get("maps_dropped_by_check")
    assert work["band"] <= work["all"]
    return unchecked


def test_band_holds_maps_that_raise_the_loss_to_never_worse():
    """Fake losses where every map raises the loss: the lowest compensated plan is checked plain and loses
    its maps (never_worse), then it is the lowest option alone; the plans out of that band are not checked
    plain (and keep maps that "all" drops: they are not picked); the pick equals the one of "all"."""
    r = [0.9, 0.1, 0.3, 0.2, 0.8, 0.6]
    block_influence = [0.9, 0.8, 0.1, 0.2, 0.7, 0.6]
    cost = [5.0, 1.0, 1.05, 1.0, 3.0, 3.0]
    # proposals: relative_update [1, 3] (plain 2.0), block_influence [2, 3] (2.05), angular run [4, 5] (6.0)
    gains = {(1, 3): -0.1, (2, 3): -0.1, (4, 5): 0.2}
    hidden = np.random.default_rng(0).normal(size=(7, 2, 3))
    hidden[6] = hidden[4]  # the last-token states entering block 4 and leaving block 5 agree
    sel, vers = {}, {}
    for mode in ("all", "band"):
        vers[mode] = GainFakeVerifier(cost, gains, mode)
        sel[mode] = verified_pick(segments=[(0, 5)], n=2, relative_update=r, block_influence=block_influence,
                                  verifier=vers[mode], last_token_hidden=hidden, greedy=False,
                                  compensate=True)
    a, b = sel["all"], sel["band"]
    names = ("relative_update_per_segment", "block_influence", "angular")
    assert [b.candidates[n]["removed"] for n in names] == [[1, 3], [2, 3], [4, 5]]
    assert (a.removed, a.picked, a.compensated) == (b.removed, b.picked, b.compensated) \
        == ([1, 3], "relative_update_per_segment", False)
    low = b.candidates["relative_update_per_segment"]
    assert low["calib_loss"] == pytest.approx(2.0) and low["calib_loss_compensated"] == pytest.approx(2.0)
    assert low["maps_dropped_by_check"] == [0, 2]
    for name in ("block_influence", "angular"):
        assert b.candidates[name]["calib_loss"] is None and a.candidates[name]["calib_loss"] is not None
        assert "not checked" in b.candidates[name]["plain"]
    assert b.candidates["block_influence"]["calib_loss_compensated"] == pytest.approx(2.15)
    assert a.candidates["block_influence"]["calib_loss_compensated"] == pytest.approx(2.05)  # map dropped
    plain_calls = lambda v: {p for p, comp in v.calls if not comp}  # noqa: E731
    assert plain_calls(vers["band"]) == {(1, 3)} and plain_calls(vers["all"]) == {(1, 3), (2, 3), (4, 5)}


def test_never_worse_drops_maps_until_the_check_is_not_above_plain(setup):
    from sglp_fast.selection.verified import never_worse

    model, batches, ver = setup
    plans = [[2, 3], [1, 3, 4], [4], [1, 2, 3, 4]]
    plain = ver.losses(plans)
    for (loss, maps, dropped), p, base in zip(never_worse(ver, plans, plain), plans, plain):
        assert loss <= base
        assert maps <= ver.map_blocks(p) and not (maps & set(dropped))
        if maps:
            assert loss == ver.losses([p], compensated=True, maps=[maps])[0]


@pytest.mark.parametrize("family", ["gpt2", "opt", "gpt_neox"])
def test_fold_matches_multiplying_the_output(family):
    """Folding T into the projection equals applying T to its output (Linear with bias, GPT-2 Conv1D)."""
    model = tiny_model(family, layers=1, seed=8).double()
    adapter = get_adapter(model)
    proj = __import__("sglp_fast.selection.compensation", fromlist=["x"]).mlp_output_module(adapter, adapter.blocks[0])
    d = 32
    T = torch.eye(d, dtype=torch.float64) + 0.1 * torch.randn(d, d, dtype=torch.float64)
    x = torch.randn(5, proj.weight.shape[0 if module_kind(proj) == "conv1d" else 1], dtype=torch.float64)
    want = proj(x) @ T
    new = folded(proj, T)
    for name, value in new.items():  # the state-dict form used when streaming a checkpoint
        torch.testing.assert_close(fold_state_tensor(module_kind(proj), name, getattr(proj, name).detach(), T), value)
    for name, value in new.items():
        getattr(proj, name).data = value
    torch.testing.assert_close(proj(x), want, rtol=1e-12, atol=1e-12)


def test_compensation_refused_where_the_mlp_output_is_normalized():
    """Gemma2 normalizes the MLP output before the residual add: no fold, a clear error."""
    model = tiny_model("gemma2", layers=3, seed=9)
    ver = _verifier(model, tiny_batches("gemma2"), 1, keep_all=True)
    try:
        with pytest.raises(ValueError, match="compensate: not supported for llama models \\(gemma2\\)"):
            ver.prepare([[1]])
    finally:
        ver.close()


# ------------------------------------------------------------------------------------------ verified search
class FakeVerifier:
    """loss(R) = sum of per-block costs + pair penalties; counts calls like the real one."""

    num_windows = 1
    block_forwards = 0.0
    plain_checks = "all"

    def __init__(self, cost, pair=None, comp_gain=0.0):
        self.cost, self.pair, self.comp_gain = np.asarray(cost, float), dict(pair or {}), comp_gain
        self.calls = []

    def losses(self, plans, compensated=False, all_windows=False, maps=None, policy=None):
        comps = [compensated] * len(plans) if isinstance(compensated, bool) else list(compensated)
        out = []
        for p, comp in zip(plans, comps):
            p = sorted(set(p))
            self.calls.append((tuple(p), comp))
            value = float(self.cost[p].sum()) + sum(self.pair.get((a, b), 0.0) for a, b in itertools.combinations(p, 2))
            out.append(value - (self.comp_gain * len(p) if comp else 0.0))
        return out

    def batch_losses(self, plans, compensated=False, all_windows=False, maps=None, policy=None):
        return [[x] for x in self.losses(plans, compensated)]  # one check batch: 1-SE = the lowest

    def prepare(self, plans, policy=None):
        pass

    def map_choices(self, removed, policy=None):
        from sglp_fast.selection.regularization import MapChoice
        return {a - 1: MapChoice(alpha=1.0, shrink=1.0, cv_gain=None) for a, _ in runs_of(removed) if a >= 1}

    def map_blocks(self, removed, policy=None):
        return frozenset(self.map_choices(removed))

    def transforms(self, removed, fold=None, maps=None, policy=None):
        return {}

    def run_distances(self, n):  # a run's "distance": its blocks' summed cost (lowest = cheapest run)
        return np.array([float(self.cost[s:s + n].sum()) for s in range(len(self.cost) - n + 1)])


class NoisyFakeVerifier(FakeVerifier):
    """Four check batches: the fake loss plus a per-batch offset ``noise[plan][b]`` (mean zero)."""

    def __init__(self, cost, noise):
        super().__init__(cost)
        self.noise = {tuple(sorted(k)): np.asarray(v, float) for k, v in noise.items()}

    def batch_losses(self, plans, compensated=False, all_windows=False, maps=None, policy=None):
        return [list(x + self.noise.get(tuple(sorted(set(p))), np.zeros(4)))
                for p, x in zip(plans, self.losses(plans, compensated))]


class GainFakeVerifier(NoisyFakeVerifier):
    """Compensated loss = plain - ``gains[plan]`` x (share of the plan's maps kept); no map kept: plain."""

    def __init__(self, cost, gains, plain_checks):
        super().__init__(cost, {})
        self.gains = {tuple(sorted(k)): v for k, v in gains.items()}
        self.plain_checks = plain_checks

    def losses(self, plans, compensated=False, all_windows=False, maps=None, policy=None):
        comps = [compensated] * len(plans) if isinstance(compensated, bool) else list(compensated)
        maps = [None] * len(plans) if maps is None else list(maps)
        out = []
        for p, comp, m in zip(plans, comps, maps):
            p = sorted(set(p))
            every = self.map_blocks(p)
            kept = every if m is None else frozenset(m)
            share = len(kept) / len(every) if comp and every else 0.0
            self.calls.append((tuple(p), share > 0))  # no map kept: the plain check
            out.append(float(self.cost[p].sum()) - self.gains.get(tuple(p), 0.0) * share)
        return out

    def batch_losses(self, plans, compensated=False, all_windows=False, maps=None, policy=None):
        return [[x + 0.01, x - 0.01, x + 0.01, x - 0.01] for x in self.losses(plans, compensated, maps=maps)]


@pytest.mark.parametrize("impl", [FakeVerifier, NoisyFakeVerifier, SkipVerifier])
def test_verifiers_match_the_protocols(impl):
    """The fakes the search is tested with, and the real verifier, have the protocol's exact signatures."""
    import inspect

    from sglp_fast.selection.protocols import BlockRunner, Verifier

    def params(fn):  # names, kinds and defaults (annotations aside)
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    protocols = (Verifier, BlockRunner) if impl is SkipVerifier else (Verifier,)
    for proto in protocols:
        for name, member in vars(proto).items():
            if name.startswith("_") or not callable(member):
                continue
            assert params(getattr(impl, name)) == params(member), (impl, name)
        for name in ("num_windows", "block_forwards", "plain_checks") if proto is Verifier else ():
            assert hasattr(impl, name), (impl, name)


def test_one_standard_error_rule_prefers_the_simpler_plan_within_noise():
    """Lowest loss: two runs [1], [3]; the one-run plan [2, 3] is 0.01 worse with paired SE 0.05: it is kept.
    With a spread too small to cover the gap, the lowest plan is kept."""
    r = [0.9, 0.1, 0.3, 0.2, 0.8]
    cost = [5.0, 1.0, 1.01, 1.0, 5.0]
    for spread, want in ((0.1, [2, 3]), (0.001, [1, 3])):
        noise = {(2, 3): [spread, -spread, spread, -spread]}
        ver = NoisyFakeVerifier(cost, noise)
        sel = verified_pick(segments=[(0, 4)], n=2, relative_update=r, block_influence=[0.9, 0.3, 0.1, 0.2, 0.8],
                            verifier=ver, greedy=False)
        lowest = min((c for c in sel.candidates.values() if c.get("calib_loss") is not None),
                     key=lambda c: c["calib_loss"])
        assert lowest["removed"] == [1, 3] and sel.removed == want, (spread, sel.removed)
        assert sel.to_dict()["rule"] == "one standard error"
        assert (sel.lowest_loss == sel.picked) == (want == [1, 3])


def test_run_candidates_are_the_lowest_distance_runs_that_fit_and_are_new():
    """run_candidates k: the k runs of lowest run_distances, skipping one another candidate proposes and one
    that breaks the frame, checked (plain and compensated) and pickable; k = 0 adds none."""
    cost = [5.0, 1.0, 0.9, 0.2, 0.3, 2.0, 0.25, 0.35, 4.0]
    r = [0.9, 0.1, 0.2, 0.8, 0.7, 0.5, 0.85, 0.95, 0.6]  # the r-based candidates avoid the cheap blocks
    hidden = np.random.default_rng(1).normal(size=(10, 3, 4))
    segments = [(0, 4), (5, 8)]
    protected_last = 1  # block 8 is protected: no run may hold it
    base = verified_pick(segments=segments, n=2, relative_update=r, block_influence=r,
                         verifier=FakeVerifier(cost), last_token_hidden=hidden, greedy=False,
                         protect_last=protected_last)
    assert not any(name.startswith("angular_run") for name in base.candidates)
    proposed = {tuple(c["removed"]) for c in base.candidates.values() if c.get("calib_loss") is not None}
    ver = FakeVerifier(cost, comp_gain=0.01)
    sel = verified_pick(segments=segments, n=2, relative_update=r, block_influence=r, verifier=ver,
                        last_token_hidden=hidden, greedy=False, protect_last=protected_last, run_candidates=2,
                        compensate=True)
    d = ver.run_distances(2)
    want = [list(range(s, s + 2)) for s in sorted(range(len(d)), key=lambda s: (d[s], s))
            if tuple(range(s, s + 2)) not in proposed
            and fits_frame(range(s, s + 2), segments, {8}, False)][:2]
    assert [sel.candidates[f"angular_run_{i}"]["removed"] for i in (1, 2)] == want
    assert want[0] == [6, 7] or want[0] == [3, 4]
    for name in ("angular_run_1", "angular_run_2"):
        c = sel.candidates[name]
        assert c["calib_loss"] == pytest.approx(float(np.sum(np.asarray(cost)[c["removed"]])))
        assert c["calib_loss_compensated"] == pytest.approx(c["calib_loss"] - 0.02)
    assert sel.removed == [3, 4] and sel.compensated  # the cheapest run, found only as a run candidate
    assert (3, 4) not in proposed
    with pytest.raises(ValueError, match="run_candidates"):
        verified_pick(segments=segments, n=2, relative_update=r, block_influence=r, verifier=ver,
                      run_candidates=-1)


@pytest.mark.parametrize("run_cost, picked", [(1.01, [1, 3]), (0.99, [1, 2])])
def test_a_run_candidate_is_picked_only_on_the_lowest_check(run_cost, picked):
    """A run candidate within one standard error of the lowest plan, but above it, is not picked (the 1-SE
    rule's preference for fewer runs would take it: it is one run against two); with the lowest check it
    is."""
    r = [0.9, 0.1, 0.3, 0.2, 0.8]  # every rule proposes [1, 3]; the one run candidate is [1, 2]
    cost = [5.0, 1.0, run_cost, 1.0, 5.0]
    ver = NoisyFakeVerifier(cost, {(1, 2): [0.1, -0.1, 0.1, -0.1]})  # within 1 SE of [1, 3] either way
    sel = verified_pick(segments=[(0, 4)], n=2, relative_update=r, block_influence=r, verifier=ver,
                        greedy=False, run_candidates=1)
    assert sel.candidates["angular_run_1"]["removed"] == [1, 2]
    assert sel.removed == picked
    assert sel.lowest_loss == sel.picked
    assert sel.picked == ("angular_run_1" if picked == [1, 2] else "relative_update_per_segment")
    # the same two options without the guard: the 1-SE rule alone takes the run
    options = [("relative_update_per_segment", False), ("angular_run_1", False)]
    losses = {"relative_update_per_segment": 2.0, "angular_run_1": 1.0 + run_cost}
    per_batch = {o: np.asarray(ver.batch_losses([[1, 3] if o[0].startswith("rel") else [1, 2]])[0])
                 for o in options}
    lowest = min(options, key=lambda o: losses[o[0]])
    alone = one_standard_error_pick(options, lambda o: losses[o[0]], per_batch, lowest,
                                    complexity=lambda o: 1 if o[0] == "angular_run_1" else 2)
    assert alone == ("angular_run_1", False)


def test_run_distances_equal_a_float64_reference(setup):
    """SkipVerifier.run_distances against arccos(cos)/pi of states recorded by hooks on a float64 forward,
    over the check windows' real tokens only (left padding excluded; windows of 3 to 9 tokens)."""
    model, batches, ver = setup
    check = batches[:ver._nv]
    states = []  # per batch: [block inputs..., last block output]
    blocks = get_adapter(model).blocks
    for batch in check:
        seen = []
        hooks = [b.register_forward_pre_hook(
            lambda m, args, kw: seen.append(args[0] if args else kw["hidden_states"]), with_kwargs=True)
            for b in blocks]
        hooks.append(blocks[-1].register_forward_hook(
            lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out)))
        with torch.no_grad():
            model(**batch)
        for h in hooks:
            h.remove()
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool().numpy()
        states.append(([x.detach().numpy().astype(np.float64)[mask] for x in seen]))
    L = len(blocks)
    for n in (1, 2, L):
        total, count = np.zeros(L - n + 1), 0
        for per_layer in states:
            count += per_layer[0].shape[0]
            for s in range(L - n + 1):
                a, b = per_layer[s], per_layer[s + n]
                norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
                cos = np.clip((a * b).sum(-1) / norms, -1, 1)
                total[s] += (np.arccos(cos) / np.pi).sum()
        np.testing.assert_allclose(ver.run_distances(n), total / count, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="does not fit"):
        ver.run_distances(L + 1)


def _brute_force(cost, n, segments, protected):
    best = None
    for combo in itertools.combinations(range(len(cost)), n):
        if fits_frame(combo, segments, protected, False):
            value = sum(cost[i] for i in combo)
            if best is None or value < best[0]:
                best = (value, sorted(combo))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_greedy_is_optimal_for_additive_losses(seed):
    """With every block on the shortlist and an additive loss, the frame is a partition matroid: greedy
    must find the brute-force optimum (a bug in the frame or the bookkeeping breaks this)."""
    rng = np.random.default_rng(seed)
    L = 9
    cut = sorted(rng.choice(np.arange(1, L), size=2, replace=False))
    segments = [(0, cut[0] - 1), (cut[0], cut[1] - 1), (cut[1], L - 1)]
    cost = rng.random(L)
    n = int(rng.integers(1, L - 3))
    ver = FakeVerifier(cost)
    sel = verified_pick(segments=segments, n=n, relative_update=rng.random(L), block_influence=rng.random(L),
                        verifier=ver, shortlist=L, protect_first=1)
    value, best = _brute_force(cost, n, segments, {0})
    greedy = sel.candidates["greedy"]
    assert greedy["removed"] == best and greedy["calib_loss"] == pytest.approx(value)
    assert sel.candidates[sel.picked]["calib_loss"] == min(
        c["calib_loss"] for c in sel.candidates.values() if c["calib_loss"] is not None)
    assert fits_frame(sel.removed, segments, {0}, False)


def test_greedy_avoids_a_pair_the_ranking_would_take():
    """Blocks 1 and 2 rank lowest and are cheap alone, but expensive together: the loss check splits them."""
    r = [0.9, 0.1, 0.2, 0.3, 0.8, 0.7]
    cost = [1.0, 0.1, 0.1, 0.2, 1.0, 1.0]
    ver = FakeVerifier(cost, pair={(1, 2): 5.0})
    sel = verified_pick(segments=[(0, 5)], n=2, relative_update=r, block_influence=r, verifier=ver, shortlist=3)
    assert sel.candidates["greedy"]["removed"] in ([1, 3], [2, 3])
    assert sel.candidates["relative_update_global"]["removed"] == [1, 2]
    assert sel.removed in ([1, 3], [2, 3]) and sel.picked == "greedy" and not sel.compensated


def test_pick_weighs_compensated_candidates_and_skips_frame_breakers():
    r = [0.5, 0.1, 0.2, 0.3, 0.4, 0.6]
    ver = FakeVerifier([1.0, 0.3, 0.2, 0.1, 0.4, 1.0], comp_gain=0.05)
    hidden = np.random.default_rng(0).normal(size=(7, 3, 4))
    segments = [(0, 2), (3, 5)]
    sel = verified_pick(segments=segments, n=3, relative_update=r, block_influence=r, verifier=ver,
                        last_token_hidden=hidden, compensate=True)
    assert sel.compensated  # the fake gain makes every compensated plan cheaper
    assert set(sel.candidates) == set(CANDIDATES)
    for name, c in sel.candidates.items():
        if c.get("skipped"):
            assert not fits_frame(c["removed"], segments, set(), False)
        else:
            assert c["calib_loss_compensated"] == pytest.approx(c["calib_loss"] - 0.15)
    assert all(fits_frame(c["removed"], segments, set(), False) for c in sel.candidates.values() if not c.get("skipped"))
    with pytest.raises(ValueError, match="shortlist"):
        verified_pick(segments=segments, n=1, relative_update=r, block_influence=r, verifier=ver, shortlist=0)


# ------------------------------------------------------------------------------------ through the public API
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from pipeline_models import save_tiny, single_thread

    with single_thread():
        yield save_tiny(tmp_path_factory.mktemp("verified") / "tiny", "llama", layers=7, seed=11)


API_CALIB = dict(calib_seqs=6, seq_len=20)


def test_default_prune_is_verified_without_backward_and_its_loss_is_real(tiny_dir, tmp_path):
    """The saved model's loss on the check windows equals what the search recorded for the plan it kept."""
    import transformers as tf

    import sglp_fast
    from sglp_fast.calibration.text import load_calibration
    from sglp_fast.plan import Plan

    res = sglp_fast.prune(str(tiny_dir), "builtin", remove=3, output=tmp_path / "out", **API_CALIB)
    plan = res.plan
    assert plan.scorer == "verified" and res.analysis.calib_result.grad_norm is None  # no backward ran
    assert "gradnorm" not in plan.scores and "relative_update" in plan.scores
    sel = plan.extra["selection"]
    picked = sel["candidates"][sel["picked"]]
    assert plan.removed == picked["removed"] and sel["verify_windows"] == 6  # every window, cross-fitted
    assert res.analysis.verifier.closed  # prune frees the cached inputs
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = load_calibration("builtin", res.tokenizer, n_seqs=6, seq_len=20).input_ids
    with torch.no_grad():
        loss = float(reference_loss(reloaded, "llama", [{"input_ids": w[None]} for w in ids])[0])
    # compensated: the maps were refitted on every window once the check had picked; the verifier's loss of
    # that model (same analysis again: deterministic) is what the saved files give
    assert "calib_loss_refit" not in sel  # an in-sample record the search no longer pays a pass for
    if sel["compensated"]:
        with sglp_fast.analyze(str(tiny_dir), "builtin", remove=3, **API_CALIB) as again:
            assert again.plan.removed == plan.removed and again.plan.extra["selection"]["maps"] == sel["maps"]
            recorded = again.verifier.losses([plan.removed], compensated=True, all_windows=True,
                                             maps=[sel["maps"]])[0]
    else:
        recorded = picked["calib_loss"]
    assert loss == pytest.approx(recorded, rel=1e-5)
    assert sel["candidates"]["greedy"]["skipped"] == "not run"  # compensation on: no greedy by default
    assert (plan.extra.get("compensation") is not None) == sel["compensated"]
    assert Plan.load(tmp_path / "out").removed == plan.removed


def test_a_plain_pick_with_compensation_on_records_no_maps(tiny_dir, monkeypatch):
    """Compensation on, the pick plain (here forced): the plan has no maps and no compensation entry; the
    selection still records the search's d x d matrices (their statistics were gathered)."""
    import sglp_fast
    from sglp_fast.selection import registry

    real, search, choices = registry.verified_pick, registry._verified_search, []
    monkeypatch.setattr(registry, "verified_pick",
                        lambda **kw: dataclasses.replace(real(**kw), compensated=False, maps=[]))
    monkeypatch.setattr(registry, "_verified_search", lambda *a: choices.append(search(*a)) or choices[-1])
    with sglp_fast.analyze(str(tiny_dir), "builtin", remove=3, **API_CALIB) as an:
        plan = an.plan
    assert len(choices) == 1 and choices[0].transforms is None and choices[0].compensation is None
    assert an.compensate and plan.transforms is None and "compensation" not in plan.extra
    assert plan.extra["selection"]["compensated"] is False
    assert plan.extra["selection"]["matrices"]["peak_in_memory_bytes"] > 0


def test_compensated_plan_saves_loads_applies_and_streams(tiny_dir, tmp_path):
    import transformers as tf

    import sglp_fast
    from sglp_fast.plan import COMPENSATION_FILE, Plan, build_plan
    from sglp_fast.pruning import apply_plan, prune_checkpoint, save_pruned

    with sglp_fast.analyze(str(tiny_dir), "builtin", **API_CALIB) as an:
        assert an.compensate and an.plan.removed is None
        removed = [2, 3, 5]
        T = an.verifier.transforms(removed, policy="fixed")
        assert sorted(T) == [1, 4]
        plan = build_plan(model_info=an.model_info, calibration=an.calibration_info, cka=an.cka,
                          segments=an.plan.segments, k=an.plan.k, k_rule=an.plan.k_rule, scorer="verified",
                          scores=an.scores, remove=3, selection={"removed": removed, "method": "verified"},
                          transforms=T, compensation={"alpha": 1.0},
                          allow_empty_segments=True)
    assert plan.extra["compensation"]["blocks"] == [1, 4]
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    want = _pruned(model, removed, T)
    out = save_pruned(apply_plan(copy.deepcopy(model), plan), None, plan, tmp_path / "mem")
    saved = tf.AutoModelForCausalLM.from_pretrained(out).state_dict()
    for k, v in want.state_dict().items():
        torch.testing.assert_close(saved[k], v, rtol=0, atol=0)
    loaded = Plan.load(out)  # reads compensation.safetensors beside plan.json
    for blk, t in T.items():
        torch.testing.assert_close(loaded.transforms[blk], t.float().double())
    again = apply_plan(tf.AutoModelForCausalLM.from_pretrained(tiny_dir).eval(), loaded).state_dict()
    streamed = prune_checkpoint(tiny_dir, loaded, tmp_path / "stream", max_shard_bytes=20_000)
    s_state = tf.AutoModelForCausalLM.from_pretrained(streamed).state_dict()
    for k, v in again.items():
        assert torch.equal(s_state[k], v), k  # streamed fold == in-memory fold, bit for bit
        torch.testing.assert_close(v, saved[k], rtol=1e-5, atol=1e-6)  # float32-stored maps: rounding only
    (out / COMPENSATION_FILE).unlink()
    with pytest.raises(ValueError, match="compensation.safetensors is missing"):
        Plan.load(out)


def test_compensate_switch(tiny_dir):
    import sglp_fast

    with pytest.raises(ValueError, match="all 4 calibration windows are used by the loss check.*folds=1"):
        sglp_fast.analyze(str(tiny_dir), "builtin", calib_seqs=4, seq_len=20, compensate=True, folds=1)
    with pytest.raises(ValueError, match="fit_windows: extra fit windows only feed compensation"):
        sglp_fast.analyze(str(tiny_dir), "builtin", compensate=False, fit_windows=2, **API_CALIB)
    with pytest.raises(ValueError, match="part of the 'verified' scorer"):
        sglp_fast.analyze(str(tiny_dir), "builtin", scorer="block_influence", compensate=True, **API_CALIB)
    with pytest.raises(ValueError, match="gradients: scorer 'gradnorm' needs the backward"):
        sglp_fast.analyze(str(tiny_dir), "builtin", scorer="gradnorm", gradients=False, **API_CALIB)
    with pytest.raises(ValueError, match="greedy: expected True, False or None"):
        sglp_fast.analyze(str(tiny_dir), "builtin", greedy="yes", **API_CALIB)
    with sglp_fast.analyze(str(tiny_dir), "builtin", remove=2, compensate=False, **API_CALIB) as an:
        sel = an.plan.extra["selection"]
        assert not sel["compensated"] and "compensation" not in an.plan.extra
        assert all("calib_loss_compensated" not in c for c in sel["candidates"].values())
        assert len(sel["greedy_steps"]) == 2 and sel["candidates"]["greedy"]["calib_loss"] is not None
    with sglp_fast.analyze(str(tiny_dir), "builtin", remove=2, greedy=True, **API_CALIB) as an:
        sel = an.plan.extra["selection"]
        assert len(sel["greedy_steps"]) == 2 and "calib_loss_compensated" in sel["candidates"]["greedy"]


def test_chosen_plan_maps_are_refitted_on_every_window(tiny_dir):
    """The search checks each window with maps fitted without its fold; the saved ones use every window."""
    import sglp_fast

    with sglp_fast.analyze(str(tiny_dir), "builtin", **API_CALIB) as an:
        ver, removed = an.verifier, [2, 3, 5]
        search, final = ver.transforms(removed, fold=0, policy="fixed"), ver.transforms(removed, policy="fixed")
        assert sorted(search) == sorted(final) == [1, 4]
        assert all(not torch.equal(search[b], final[b]) for b in search)
        assert ver.losses([removed], compensated=True, all_windows=True, maps=[[1, 4]], policy="fixed")[0] != \
            ver.losses([removed], compensated=True, maps=[[1, 4]], policy="fixed")[0]


def test_a_plans_statistics_are_what_its_maps_are_fitted_from(tiny_dir):
    """``statistics(removed)``: per block before a run (a >= 1), the statistics its final map is fitted from
    (the map refitted from them is the verifier's, bit for bit); the row weighting follows the policy."""
    import sglp_fast
    from sglp_fast.selection import regularization as R

    with sglp_fast.analyze(str(tiny_dir), "builtin", **API_CALIB) as an:
        ver, removed = an.verifier, [0, 2, 3, 5]  # run 0..0 starts the model: no block before it, no map
        stats = ver.statistics(removed, policy="fixed")
        assert sorted(stats) == [1, 4]
        final = ver.transforms(removed, policy="fixed")
        choices = ver.map_choices(removed, policy="fixed")
        for p, st in stats.items():
            assert torch.equal(R.fit(st, choices[p]), final[p])
        unweighted = ver.statistics(removed, policy="replaceme")
        assert not torch.equal(unweighted[1].gram, stats[1].gram)  # ReplaceMe's rows are not weighted
        assert stats[1].gram.shape == (ver.folds + 1, 32, 32) and float(stats[1].tokens.sum()) > 0


def test_fit_only_windows_feed_the_statistics_and_nothing_else(tiny_dir):
    """fit_windows=3: the CKA, scores and check see the same 6 windows; the maps' statistics gain the 3
    extra windows, exactly the statistics those windows give when kept."""
    import sglp_fast
    from sglp_fast.calibration.text import load_calibration

    with sglp_fast.analyze(str(tiny_dir), "builtin", **API_CALIB) as plain:
        ids = load_calibration("builtin", plain.tokenizer, n_seqs=9, seq_len=20).input_ids
        with sglp_fast.analyze(str(tiny_dir), ids, fit_windows=3, **API_CALIB) as extra, \
                sglp_fast.analyze(str(tiny_dir), ids, calib_seqs=9, seq_len=20, verify_windows=6) as kept:
            np.testing.assert_array_equal(extra.cka, plain.cka)
            assert extra.scores == plain.scores and extra.verifier.num_windows == 6
            assert extra.calibration_info["fit_only_windows"] == 3
            for v in (plain.verifier, extra.verifier, kept.verifier):
                v.prepare([[2, 3]])
            a, b, c = (v.verifier._stats[(2, 3), R.CV.weighted] for v in (plain, extra, kept))
            torch.testing.assert_close(b.gram[:4], a.gram[:4], rtol=0, atol=0)  # same held-out folds
            torch.testing.assert_close(b.gram.sum(0), c.gram.sum(0), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(b.cross.sum(0), c.cross.sum(0), rtol=1e-5, atol=1e-6)
            assert int(b.tokens.sum()) == int(c.tokens.sum()) > int(a.tokens.sum())


def test_fit_only_observer_takes_each_batch_from_grouped_block_calls():
    """FitOnlyObserver under calibrate's windows_per_call (several batches per block call, and batches of
    another shape in a call of their own): the same statistics as one batch per call (float64 model)."""
    from sglp_fast.calibration.losses import token_mask
    from sglp_fast.selection.run_statistics import FitOnlyObserver

    model_seed, batch_seed = _seeds(2, seed=7)
    model = tiny_model("llama", layers=5, seed=model_seed).double()
    batches = _batches(seed=batch_seed, shapes=((1, 6), (1, 6), (1, 6), (2, 5), (2, 5), (1, 5)))
    runs = [(1, 2), (2, 4), (3, 3)]
    stats, calls = {}, {}
    proj = get_adapter(model).blocks[0].mlp.down_proj
    for per_call in (1, 3, 4):
        observer = FitOnlyObserver(get_adapter(model), runs, weighted=False)
        count = []
        hook = proj.register_forward_hook(lambda *a: count.append(1))
        try:
            res = calibrate(model, batches, observers=[observer], gradients=False, keep_inputs=0,
                            windows_per_call=per_call, progress=False)
        finally:
            observer.close()
            hook.remove()
        assert res.timings["windows_per_call"] == per_call
        stats[per_call], calls[per_call] = observer.stats, len(count)
    assert calls == {1: 6, 3: 4, 4: 3}  # [0-2] [3] [4] [5] with 3; [0-2] [3, 4] [5] with 4
    for per_call in (3, 4):
        for run in runs:
            a, b = stats[1][run], stats[per_call][run]
            tokens = sum(int(token_mask(x).sum()) for x in batches)
            assert int(a.tokens.sum()) == int(b.tokens.sum()) == tokens
            for x, y in ((a.gram, b.gram), (a.cross, b.cross), (a.energy, b.energy)):
                torch.testing.assert_close(y, x, rtol=1e-10, atol=1e-12)
    observer = FitOnlyObserver(get_adapter(model), runs, weighted=False)
    try:
        with pytest.raises(RuntimeError, match="was not recorded"):
            observer._take(0, 1)  # no call of block 0 recorded
    finally:
        observer.close()


def test_plans_checked_a_few_at_a_time_give_the_same_losses(setup):
    """plans_per_pass (the memory plan's cap on the plans whose hidden states a pass holds at once): the same
    losses, bit for bit, plain and compensated, in more passes (each reading the blocks again)."""
    model, batches, ver = setup
    plans = [(1, 2), (2,), (1, 2, 4), (3, 4), (4,)]
    res = calibrate(model, batches, gradients=False, progress=False, keep_inputs=7)
    with SkipVerifier(res.kept_inputs, 3, plans_per_pass=2) as capped:
        assert capped.plans_per_pass == 2
        for compensated in (False, True):
            assert capped.batch_losses(plans, compensated=compensated) == ver.batch_losses(plans, compensated=compensated)
        reads = []
        real = capped._kept.block
        capped._kept.block = lambda layer, nxt=None: reads.append(layer) or real(layer, nxt)
        capped.losses([(0,), (1,), (3,)])  # 3 new plans, 2 a pass: two passes, block 5 read in each
        assert reads.count(5) == 2, reads
    with pytest.raises(ValueError, match="plans_per_pass"):
        SkipVerifier(calibrate(model, batches, gradients=False, progress=False, keep_inputs=3).kept_inputs, 3,
                     plans_per_pass=0)


def test_no_more_folds_than_check_windows(setup):
    """An empty fold fits and judges nothing but would hold d x d statistics and maps: a check of 1 window
    has 1 fold, whatever folds asks for."""
    model, batches, _ = setup
    res = calibrate(model, batches, gradients=False, progress=False, keep_inputs=7)
    with SkipVerifier(res.kept_inputs, 1, folds=4) as one:
        assert one.folds == 1 and one.fold_of_batch == [0, 1, 1, 1, 1]
        one.prepare([[2]])
        assert all(st.gram.shape[0] == 2 for st in one._stats.values())


@pytest.mark.parametrize("run_candidates", [0, 3])
def test_the_memory_budget_counts_every_matrix_the_search_holds(tmp_path, run_candidates):
    """api._memory_budget's bound on the d x d float64 matrices of the compensated search (statistics per fold,
    maps per fold and final, of every candidate's runs), known before calibration, is at or above what the
    search held. Here (seed 8, one block removed) two candidates (and each run candidate) remove different
    blocks, so the typical count (one plan's runs and one per run candidate, the one the predicted peak
    uses) is short, and the plan says so."""
    import sglp_fast
    from pipeline_models import save_tiny
    from sglp_fast.api import _memory_budget

    analysis = sglp_fast.analyze(str(save_tiny(tmp_path / "tiny", "llama", layers=7, seed=8)), "builtin", remove=1,
                                 run_candidates=run_candidates, **API_CALIB)
    try:
        ver = analysis.verifier
        held = sum(2 * st.gram.shape[0] for st in ver._stats.values()) + len(ver._fitted)
        runs = {run for run, _ in ver._stats}
        assert len(runs) == 2 + analysis.search.run_candidates, runs  # 2 proposals, each run candidate
        budget = _memory_budget(None, get_adapter(analysis.model), analysis.calibration.batches(), analysis.search, 1)
        assert budget.host_matrices < held <= budget.host_matrices_bound, (held, budget)
        assert budget.solve_matrices == 2 * ver.folds, budget  # one run's V and Vᵀ C per fold, while it is solved
        from sglp_fast.calibration.memory import fmt_bytes, preflight

        plan = str(preflight(get_adapter(analysis.model), analysis.calibration.batches(), budget, gradients=False,
                             keep_inputs=6))
        d2 = 8 * analysis.model.config.hidden_size ** 2
        assert f"up to {fmt_bytes(budget.host_matrices_bound * d2)} if the candidate plans remove" in plan, plan
    finally:
        analysis.close()


def test_self_sampled_windows_feed_the_maps_as_the_same_windows_given_as_text(tiny_dir):
    """self_fit_windows=3: the model samples 3 windows (seed = the analysis seed) that feed the statistics
    exactly as those windows would given as fit-only text, and nothing else (the CKA, scores and check are the
    calibration windows'); the plan and the calibration record say so. Default: 16 sampled windows."""
    import sglp_fast
    from sglp_fast.calibration.self_text import sample_windows, start_token
    from sglp_fast.calibration.text import load_calibration

    with sglp_fast.analyze(str(tiny_dir), "builtin", self_fit_windows=3, remove=2, **API_CALIB) as own, \
            sglp_fast.analyze(str(tiny_dir), "builtin", self_fit_windows=0, remove=2, **API_CALIB) as none:
        ids = load_calibration("builtin", own.tokenizer, n_seqs=6, seq_len=20).input_ids
        sampled = sample_windows(own.model, range(3), 20, start=start_token(own.model, own.tokenizer), seed=0)
        with sglp_fast.analyze(str(tiny_dir), torch.cat([ids, sampled]), fit_windows=3, self_fit_windows=0,
                               remove=2, **API_CALIB) as text:
            np.testing.assert_array_equal(own.cka, none.cka)
            assert own.scores == none.scores and own.verifier.num_windows == none.verifier.num_windows == 6
            info = own.calibration_info
            assert info["self_fit_windows"] == 3 and "fit_only_windows" not in info and info["self_fit_seed"] == 0
            assert "self_fit_windows" not in none.calibration_info and own.timings["sample_s"] > 0
            for a in (own, none, text):
                a.verifier.prepare([[2, 3]])
            o, n, t = (a.verifier._stats[(2, 3), R.CV.weighted] for a in (own, none, text))
            assert torch.equal(o.gram, t.gram) and torch.equal(o.cross, t.cross)
            assert int(o.tokens.sum()) == int(n.tokens.sum()) + 3 * 20
            assert own.plan.removed == text.plan.removed
            assert own.plan.extra["selection"]["self_fit_windows"] == 3
            assert none.plan.extra["selection"]["self_fit_windows"] == 0
    with sglp_fast.analyze(str(tiny_dir), "builtin", **API_CALIB) as auto:
        assert auto.search.self_fit_windows == 16 and auto.calibration_info["self_fit_windows"] == 16


def test_self_sampled_windows_of_their_own_length_feed_the_maps(tiny_dir):
    """self_fit_len=7 (the calibration windows have 20 tokens): the model samples 3 windows of 7 tokens, and
    they add to the statistics of a run exactly their rows' X^T X and X^T Y, checked against a float64 sum
    over hooks of a plain forward of those windows (X: block p's MLP output, Y: block b's output minus block
    p's); the plan and the calibration record carry the length. Asking for it with no sampled windows, or
    below 2 tokens, is an error naming the setting."""
    import sglp_fast
    from sglp_fast.calibration.self_text import sample_windows, start_token

    run, length = (2, 4), 7
    with sglp_fast.analyze(str(tiny_dir), "builtin", self_fit_windows=3, self_fit_len=length, remove=2,
                           **API_CALIB) as own, \
            sglp_fast.analyze(str(tiny_dir), "builtin", self_fit_windows=0, remove=2, **API_CALIB) as none:
        for a in (own, none):
            a.verifier.prepare([list(range(run[0], run[1] + 1))])
        o, n = (a.verifier._stats[run, R.CV.weighted] for a in (own, none))
        assert int(o.tokens.sum()) == int(n.tokens.sum()) + 3 * length
        assert own.calibration_info["self_fit_len"] == length
        assert own.plan.extra["selection"]["self_fit_len"] == length
        start = start_token(own.model, own.tokenizer)
        sampled = sample_windows(own.model, range(3), length, start=start, seed=0)
        assert sampled.shape == (3, length) and not torch.equal(sampled[0], sampled[1])
        layers, seen = own.model.model.layers, {}
        p, b = run[0] - 1, run[1]

        def keep(name):
            return lambda mod, inp, out: seen.__setitem__(name, out[0] if isinstance(out, tuple) else out)

        hooks = [layers[p].mlp.down_proj.register_forward_hook(keep("m")),
                 layers[p].register_forward_hook(keep("p")), layers[b].register_forward_hook(keep("b"))]
        try:
            with torch.no_grad():
                own.model(input_ids=sampled)
        finally:
            for h in hooks:
                h.remove()
        X = seen["m"].double().reshape(-1, seen["m"].shape[-1])
        Y = (seen["b"].double() - seen["p"].double()).reshape(X.shape)
        gram, cross = (o.gram - n.gram).sum(0), (o.cross - n.cross).sum(0)
        torch.testing.assert_close(gram, X.T @ X, rtol=1e-4, atol=1e-6 * float((X.T @ X).abs().max()))
        torch.testing.assert_close(cross, X.T @ Y, rtol=1e-4, atol=1e-6 * float((X.T @ Y).abs().max()))
    with pytest.raises(ValueError, match="self_fit_len: .*none are sampled"):
        sglp_fast.analyze(str(tiny_dir), "builtin", self_fit_windows=0, self_fit_len=8, **API_CALIB)
    with pytest.raises(ValueError, match="self_fit_len"):
        sglp_fast.analyze(str(tiny_dir), "builtin", self_fit_len=1, **API_CALIB)
    limit = get_adapter(own.model).max_positions()
    with pytest.raises(ValueError, match=f"self_fit_len: {limit + 1} tokens per window exceed"):
        sglp_fast.analyze(str(tiny_dir), "builtin", self_fit_len=limit + 1, **API_CALIB)


def test_sampling_batch_holds_the_default_tokens():
    """Short sampled windows go in wider batches (16 x 256 tokens' worth), never fewer than 16 windows."""
    from sglp_fast.calibration.self_text import sampling_batch

    assert [sampling_batch(t) for t in (256, 64, 1000, 4096, 5)] == [16, 64, 16, 16, 819]
    with pytest.raises(ValueError, match="length"):
        sampling_batch(0)


def test_self_sampled_windows_off_where_the_model_cannot_sample(tiny_dir):
    """A lazily loaded model would read every block per sampled token: auto gives 0 windows (recorded), and
    asking for them is an error naming the fix; so is asking with compensation off."""
    import sglp_fast

    with sglp_fast.analyze(str(tiny_dir), "builtin", lazy=True, **API_CALIB) as lazy:
        assert lazy.search.compensate and lazy.search.self_fit_windows == 0
        assert "self_fit_windows" not in lazy.calibration_info
    with pytest.raises(ValueError, match="self_fit_windows: the model cannot sample.*lazily loaded"):
        sglp_fast.analyze(str(tiny_dir), "builtin", lazy=True, self_fit_windows=2, **API_CALIB)
    with pytest.raises(ValueError, match="self_fit_windows: sampled fit windows only feed compensation"):
        sglp_fast.analyze(str(tiny_dir), "builtin", compensate=False, self_fit_windows=2, **API_CALIB)


def test_a_lazy_model_says_it_samples_no_fit_windows(tiny_dir, caplog):
    import logging

    import sglp_fast

    with caplog.at_level(logging.WARNING, logger="sglp_fast"):
        sglp_fast.analyze(str(tiny_dir), "builtin", lazy=True, **API_CALIB).close()
    assert any("no self-sampled fit windows" in r.getMessage() and "lazily loaded" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_a_model_without_a_usable_start_token_cannot_sample():
    """A tiny GPT-2 names token 50256 as BOS/EOS with 97 embeddings: nothing to start a sample from, which is
    the reason the default then samples nothing (resolution and messages: test_self_text.py)."""
    from sglp_fast.api import _why_no_sampling
    from sglp_fast.models import get_adapter

    model = tiny_model("gpt2", layers=2)
    assert "no BOS or EOS token" in _why_no_sampling(get_adapter(model), model, None)
    assert _why_no_sampling(get_adapter(model), model, types.SimpleNamespace(bos_token_id=3)) is None
    bert = tiny_model("bert", layers=2)
    assert "do not generate text" in _why_no_sampling(get_adapter(bert), bert, None)
