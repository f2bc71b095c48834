"""Compensation's d x d matrices under a memory budget: in memory up to the room, then on disk, exactly
counted; the verified search gives the same numbers wherever they live; without an offload folder a search
past its room stops with the figure and the fix; the fold maps reuse the cross-validation's decompositions."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

from tiny_models import VOCAB, tiny_model

from sglp_fast.calibration.runtime import calibrate
from sglp_fast.selection import regularization as R
from sglp_fast.selection.matrix_store import MatrixStore
from sglp_fast.selection.run_statistics import RunStatistics
from sglp_fast.selection.verifier import SkipVerifier

MiB = 2**20


def _files(root) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]


def test_the_store_keeps_matrices_in_memory_up_to_its_room_then_on_disk(tmp_path):
    store = MatrixStore(room_bytes=3 * 8 * 100, spill_dir=tmp_path)
    g = torch.Generator().manual_seed(1)
    a = store.zeros(2, 10, 10)  # 1600 bytes: fits
    b = store.keep(torch.randn(10, 10, generator=g, dtype=torch.float64))  # 800 more: 2400, fits exactly
    c_value = torch.randn(10, 10, generator=g, dtype=torch.float64)
    c = store.keep(c_value)  # past the room: a file
    d = store.zeros(3, 4)  # still past it
    assert not store.is_spilled(a) and not store.is_spilled(b)
    assert store.is_spilled(c) and store.is_spilled(d)
    assert store.keep(b) is b and store.keep(c) is c  # kept twice, counted once
    mine = torch.ones(2, dtype=torch.float64)
    assert MatrixStore().keep(mine) is mine  # kept in memory as it is: the caller's object, no copy
    assert store.resident_bytes == 2400 and store.spilled_bytes == 800 + 96
    assert len(_files(tmp_path)) == 2
    assert torch.equal(c, c_value) and not torch.any(d)  # the same values; a new file reads as zeros
    d += 2.5  # a file-backed tensor is an ordinary tensor
    assert float(d.sum()) == 2.5 * 12
    store.release(c)
    assert store.spilled_bytes == 96 and len(_files(tmp_path)) == 1
    store.release(a)
    assert store.resident_bytes == 800
    e = store.zeros(10, 10)  # room again
    assert not store.is_spilled(e)
    assert store.peak_resident_bytes == 2400 and store.peak_spilled_bytes == 896
    store.close()
    assert _files(tmp_path) == [] and store.resident_bytes == store.spilled_bytes == 0


def test_without_an_offload_folder_the_store_stops_at_its_room_with_the_fix():
    store = MatrixStore(room_bytes=1000, what="max_memory (--max-memory)")
    store.zeros(10, 10)
    with pytest.raises(ValueError, match=r"needs 1\.6 KiB.*max_memory \(--max-memory\) leaves 1000 B.*--offload-dir"):
        store.zeros(10, 10)
    assert MatrixStore().zeros(1000, 1000).shape == (1000, 1000)  # no room given: no limit
    with pytest.raises(ValueError, match="room_bytes"):
        MatrixStore(room_bytes=-1)


def _random_statistics(seed: int, d: int, folds: int, n: int = 40) -> RunStatistics:
    g = torch.Generator().manual_seed(seed)
    st = RunStatistics.zeros(folds, d)
    mix = 0.8 * torch.eye(d, dtype=torch.float64) + torch.randn(d, d, generator=g, dtype=torch.float64) * 0.3 / d**0.5
    for slot in range(folds + 1):
        X = torch.randn(n, d, generator=g, dtype=torch.float64)
        st.add(slot, X, X @ mix + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64))
    return st


@pytest.mark.parametrize("d,folds", [(1, 2), (7, 3), (33, 4)])
def test_fold_maps_from_the_decompositions_are_the_maps_fitted_afresh(d, folds, monkeypatch):
    """choose_with_solutions decomposes each fold once; the fold's map from it is bit for bit the map
    fit() makes with its own eigendecomposition, and matches a numpy ridge solve in float64."""
    st = _random_statistics(seed=d * 10 + folds, d=d, folds=folds)
    calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda G: calls.append(1) or eigh(G))
    store = MatrixStore()
    choice, solutions = R.choose_with_solutions(st, R.CV, range(folds), keep=store.keep)
    assert len(calls) == folds and sorted(solutions) == list(range(folds))
    if not choice.has_map:  # the data were built so that a map helps
        pytest.fail(f"expected a map, got {choice}")
    for f, sol in solutions.items():
        from_solution = R.fit(st, choice, f, solution=sol)
        afresh = R.fit(st, choice, f)
        assert torch.equal(from_solution, afresh)
        G, C = (x.numpy() for x in st.without(f))
        lam = choice.alpha * np.trace(G) / d
        want = np.eye(d) + choice.shrink * np.linalg.solve(G + lam * np.eye(d), C)
        np.testing.assert_allclose(from_solution.numpy(), want, rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match="decomposition of fold 0"):
        R.fit(st, choice, 1, solution=solutions[0])
    # fold maps needed f eighs in all (the search used to spend 2f); the final map one more
    assert len(calls) == folds + folds  # the ``afresh`` fits above, one each
    store.close()


def _batches(seed: int, n: int = 6, s: int = 11):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (1, s), generator=g)} for _ in range(n)]


def _search_numbers(ver: SkipVerifier, plans):
    ver.prepare(plans)
    maps = [ver.map_blocks(p) for p in plans]
    plain = ver.losses(plans)
    comp = ver.losses(plans, compensated=True, maps=maps)
    final = [ver.transforms(p) for p in plans]
    return plain, comp, [{k: v.clone() for k, v in f.items()} for f in final]


def test_the_search_gives_the_same_numbers_with_its_matrices_on_disk(tmp_path):
    model = tiny_model("llama", layers=6, seed=31).double()
    batches = _batches(seed=32)
    plans = [[2, 3], [3], [4]]

    def verifier(store):
        res = calibrate(model, batches, gradients=False, progress=False, keep_inputs=6)
        return SkipVerifier(res.kept_inputs, 6, folds=3, matrices=store)

    with verifier(MatrixStore()) as free:
        want = _search_numbers(free, plans)
        used = free.matrices.peak_resident_bytes
    d2 = 32 * 32 * 8
    room = 5 * d2  # far below what the search holds: nearly everything spills
    spill = tmp_path / "spill"
    with verifier(MatrixStore(room, spill)) as tight:
        got = _search_numbers(tight, plans)
        store = tight.matrices
        assert store.peak_resident_bytes <= room < used
        assert store.peak_spilled_bytes >= used - room
        assert _files(spill)  # the statistics and maps are files while the search runs
    assert _files(spill) == []  # closing the verifier deletes them
    assert got[0] == want[0] and got[1] == want[1]  # bit for bit: the same arithmetic on the same numbers
    for a, b in zip(got[2], want[2]):
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)

    with verifier(MatrixStore(room)) as stops:
        with pytest.raises(ValueError, match="offload-dir"):
            stops.prepare(plans)


def test_analyze_under_a_budget_spills_the_matrices_and_plans_the_same(tmp_path):
    """--max-memory with --offload-dir: the plan shows the room, the search keeps its matrices within it
    (the record's exact peak), the rest on disk, and the plan is the one an unbounded run makes."""
    import sglp_fast
    from pipeline_models import save_tiny
    from sglp_fast.sizes import size_from_text

    path = save_tiny(tmp_path / "tiny", "llama", layers=6, seed=5)
    kw = dict(remove=2, calib_seqs=6, seq_len=20)
    with sglp_fast.analyze(str(path), "builtin", **kw) as free:
        want = free.plan
    rec = want.extra["selection"]["matrices"]
    assert rec["peak_on_disk_bytes"] == 0 and rec["peak_in_memory_bytes"] > 0
    # the least this run needs with the matrices spillable: the refusal says it, rounded up (passed back
    # as printed, it is enough)
    with pytest.raises(ValueError, match="least this run needs") as info:
        sglp_fast.analyze(str(path), "builtin", max_memory=64 * 1024, offload_dir=str(tmp_path / "off"), **kw)
    budget = str(info.value).rsplit("at least ", 1)[1].split(",")[0].replace(" ", "")
    assert 0 <= size_from_text(budget) - info.value.least < 0.1 * 1024
    with sglp_fast.analyze(str(path), "builtin", max_memory=budget, offload_dir=str(tmp_path / "off"), **kw) as tight:
        got = tight.plan
        printed = tight.calib_result.memory_plan
    m = re.search(r"compensation :.*in memory up to ([0-9.]+ \w+), the rest on disk", printed)
    assert m, printed
    room = size_from_text(m.group(1))
    assert "the rest on disk" in printed and room < rec["peak_in_memory_bytes"]
    rec = got.extra["selection"]["matrices"]
    assert 0 < rec["peak_on_disk_bytes"] and rec["peak_in_memory_bytes"] <= room
    assert got.removed == want.removed
    assert got.extra["selection"]["candidates"] == want.extra["selection"]["candidates"]
    assert _files(tmp_path / "off") == []  # the matrices' files go with the verifier


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("d,other", [(1, 5), (7, 13), (6, 2)])
def test_folding_a_map_a_slice_at_a_time_is_the_whole_product(kind, d, other, monkeypatch):
    """A 70B down projection is 1.75 GiB in float64: the fold goes a slice at a time (2 rows or columns
    here, which do not divide the layer), and gives the product of the whole matrices."""
    from sglp_fast.selection import compensation

    g = torch.Generator().manual_seed(d * 100 + other)
    T = torch.randn(d, d, generator=g, dtype=torch.float64)
    W = torch.randn(*((d, other) if kind == "linear" else (other, d)), generator=g, dtype=torch.float64)
    want = T.T @ W if kind == "linear" else W @ T
    from sglp_fast.calibration import memory

    monkeypatch.setattr(memory, "FOLD_SLICE_BYTES", 8 * d * 2)
    got = compensation.fold_state_tensor(kind, "weight", W, T)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    half = compensation.fold_state_tensor(kind, "weight", W.bfloat16(), T)  # computed in float64, cast once
    assert half.dtype == torch.bfloat16
    Wb = W.bfloat16().double()
    torch.testing.assert_close(half, (T.T @ Wb if kind == "linear" else Wb @ T).bfloat16(), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_solve_on_the_gpu_gives_the_cpus_maps():
    """The maps' solves run on the compute device; on a GPU they match the CPU's in float64."""
    st = _random_statistics(seed=77, d=48, folds=3)
    store = MatrixStore()
    cpu_choice, cpu_sol = R.choose_with_solutions(st, R.CV, range(3), keep=store.keep)
    gpu_choice, gpu_sol = R.choose_with_solutions(st, R.CV, range(3), keep=store.keep, device="cuda")
    assert gpu_choice.alpha == cpu_choice.alpha and gpu_choice.shrink == pytest.approx(cpu_choice.shrink, rel=1e-9)
    for f in range(3):
        got = R.fit(st, gpu_choice, f, gpu_sol[f], device="cuda")
        assert got.device.type == "cpu"
        torch.testing.assert_close(got, R.fit(st, cpu_choice, f, cpu_sol[f]), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(R.fit(st, gpu_choice, None, device="cuda"), R.fit(st, cpu_choice, None),
                               rtol=1e-9, atol=1e-10)
    store.close()


def test_sums_without_a_fold_are_made_where_the_solve_runs():
    """RunStatistics.without(fold, device): the same sums (bit for bit on the CPU) as the sum of the other
    slots in float64; a run with one slot held out has zeros left."""
    st = _random_statistics(seed=5, d=6, folds=3)
    for fold in (None, 0, 2, 3):
        G, C = st.without(fold)
        G2, C2 = st.without(fold, "cpu")
        assert torch.equal(G, G2) and torch.equal(C, C2)
        keep = [s for s in range(4) if s != fold]
        np.testing.assert_allclose(G.numpy(), st.gram.numpy()[keep].sum(0), rtol=1e-13, atol=1e-12)
        np.testing.assert_allclose(C.numpy(), st.cross.numpy()[keep].sum(0), rtol=1e-13, atol=1e-12)
    one = RunStatistics.zeros(0, 3)
    G, C = one.without(0, "cpu")
    assert not G.any() and not C.any() and G.shape == (3, 3)
