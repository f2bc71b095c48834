"""Fisher segmentation: C++ == numpy spec == brute-force enumeration; ties; min_size; degenerate inputs.

Brute force is independent of both implementations: it enumerates every segmentation and costs each
segment directly (two-pass mean, then squared deviations), in float64.
"""
from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest

from sglp_fast.segmentation import reference as _segment_ref
from sglp_fast.segmentation.fisher import fisher_segment, fisher_segment_costs

IMPLS = ("cpp", "numpy")


def direct_costs(x: np.ndarray) -> np.ndarray:
    """D(i, j) by definition, two-pass, for every i <= j (zeros below)."""
    n = x.shape[0]
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(i, n):
            seg = x[i : j + 1]
            out[i, j] = float(((seg - seg.mean(axis=0)) ** 2).sum())
    return out


def all_segmentations(n: int, k: int, min_size: int):
    """Yield the start indices of every k-segmentation of 0..n-1 with segments >= min_size rows."""
    for cuts in itertools.combinations(range(1, n), k - 1):
        starts = (0, *cuts)
        bounds = (*starts, n)
        if all(bounds[q + 1] - bounds[q] >= min_size for q in range(k)):
            yield starts


def segments_from_starts(starts, n: int) -> list[tuple[int, int]]:
    ends = [*(s - 1 for s in starts[1:]), n - 1]
    return list(zip(starts, ends))


def brute_force(costs, n: int, k: int, min_size: int, exact: bool = False):
    """Optimal (objective, segments); among equal optima the DP's rule: smallest last start, then the
    smallest start before it, and so on (i.e. the smallest reversed tuple of starts)."""
    best_key = None
    best = None
    for starts in all_segmentations(n, k, min_size):
        segs = segments_from_starts(starts, n)
        total = sum((costs[a][b] for a, b in segs), Fraction(0) if exact else 0.0)
        key = (total, tuple(reversed(starts)))
        if best_key is None or key < best_key:
            best_key, best = key, (total, segs)
    return best


def assert_close_objective(got: float, want: float, scale: float) -> None:
    assert abs(got - want) <= 1e-12 * max(abs(want), scale), (got, want, scale)


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_brute_force_every_small_problem(seed):
    """Every L <= 12, every k <= L, min_size 1..3: breakpoints exactly, objectives within 1e-12 relative."""
    rng = np.random.default_rng(seed)
    for n in range(1, 13):
        x = rng.standard_normal((n, int(rng.integers(1, 6)))) * rng.uniform(0.5, 3.0)
        exact = direct_costs(x)
        scale = exact[0, n - 1]  # total scatter: the natural size of every objective here
        for min_size in (1, 2, 3):
            largest = n // min_size
            if largest < 1:
                continue
            runs = {impl: fisher_segment(x, k=largest, min_size=min_size, impl=impl) for impl in IMPLS}
            assert np.array_equal(runs["cpp"].objective_by_k, runs["numpy"].objective_by_k)
            for k in range(1, largest + 1):
                want_obj, want_segs = brute_force(exact, n, k, min_size)
                assert_close_objective(runs["cpp"].objective_by_k[k - 1], want_obj, scale)
                for impl in IMPLS:
                    seg = fisher_segment(x, k=k, k_max=largest, min_size=min_size, impl=impl)
                    assert seg.segments == want_segs, (impl, n, k, min_size)
                    assert seg.objective == runs[impl].objective_by_k[k - 1]
                    assert seg.k == k and seg.k_rule == "given"


@pytest.mark.parametrize(
    "n,p,k,min_size",
    [(13, 2, 5, 1), (50, 50, 7, 3), (137, 20, 16, 1), (200, 200, 12, 4), (300, 300, 30, 2), (300, 7, 64, 1)],
)
def test_cpp_bit_identical_to_numpy(n, p, k, min_size):
    rng = np.random.default_rng(n * 1000 + p)
    # correlated rows + an offset, like CKA profiles of neighbouring layers
    x = np.cumsum(rng.standard_normal((n, p)), axis=0) * 0.1 + 5.0
    cpp = fisher_segment(x, k=k, min_size=min_size, impl="cpp")
    ref = fisher_segment(x, k=k, min_size=min_size, impl="numpy")
    assert cpp.segments == ref.segments
    assert np.array_equal(cpp.objective_by_k, ref.objective_by_k)
    assert cpp.objective == ref.objective
    assert all(b - a + 1 >= min_size for a, b in cpp.segments)


@pytest.mark.parametrize("n,p", [(1, 1), (3, 2), (5, 9), (64, 3), (193, 31), (300, 300)])
def test_cost_matrix_bit_identical_and_accurate(n, p):
    from sglp_fast import _fisher

    rng = np.random.default_rng(7 + n)
    x = rng.standard_normal((n, p)) * 3.0 + rng.standard_normal(p)
    cpp = _fisher.segment_costs(x)
    ref = _segment_ref.segment_costs(x)
    assert np.array_equal(cpp, ref)
    if n <= 64:
        exact = direct_costs(x)
        assert np.max(np.abs(ref - exact)) <= 1e-12 * max(exact[0, n - 1], 1.0)
    assert np.all(np.tril(ref, -1) == 0.0) and np.all(np.diag(ref) == 0.0) and np.all(ref >= 0.0)


def test_costs_survive_a_large_common_offset():
    """Centring by the global mean keeps Σ‖x‖² − ‖Σx‖²/n from cancelling away small scatters."""
    rng = np.random.default_rng(3)
    noise = rng.standard_normal((40, 6))
    x = 1e8 + noise
    exact = direct_costs(noise)  # scatter is shift invariant: cost the noise alone
    got = _segment_ref.segment_costs(x)
    assert np.max(np.abs(got - exact)) <= 1e-6 * exact[0, -1]
    assert fisher_segment(x, k=5).segments == fisher_segment(noise, k=5).segments


def test_threads_do_not_change_results():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((290, 40))
    runs = [fisher_segment(x, k=20, threads=t) for t in (1, 2, 3, 8)]
    for seg in runs[1:]:
        assert seg.segments == runs[0].segments
        assert np.array_equal(seg.objective_by_k, runs[0].objective_by_k)


@pytest.mark.parametrize("impl", IMPLS)
def test_profiles_and_cost_entry_points_agree(impl):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((40, 8))
    costs = _segment_ref.segment_costs(x)
    a = fisher_segment(x, k=6, k_max=9, min_size=2, impl=impl)
    b = fisher_segment_costs(costs, k=6, k_max=9, min_size=2, impl=impl)
    assert a.segments == b.segments and np.array_equal(a.objective_by_k, b.objective_by_k)
    # the lower triangle is ignored, whatever it holds
    junk = costs + np.tril(np.full(costs.shape, np.nan), -1)
    c = fisher_segment_costs(junk, k=6, k_max=9, min_size=2, impl=impl)
    assert c.segments == a.segments and np.array_equal(c.objective_by_k, a.objective_by_k)


# ------------------------------------------------------------------------------------------------ ties


@pytest.mark.parametrize("seed", range(6))
def test_ties_on_integer_costs_follow_the_stated_rule(seed):
    """Small integer costs make many exactly tied optima; both impls must pick the same documented one."""
    rng = np.random.default_rng(100 + seed)
    n = 9
    costs = np.triu(rng.integers(0, 3, size=(n, n))).astype(np.float64)
    exact = [[Fraction(int(v)) for v in row] for row in costs]
    for min_size in (1, 2):
        for k in range(1, n // min_size + 1):
            want_obj, want_segs = brute_force(exact, n, k, min_size, exact=True)
            for impl in IMPLS:
                seg = fisher_segment_costs(costs, k=k, min_size=min_size, impl=impl)
                assert seg.segments == want_segs, (impl, k, min_size)
                assert seg.objective == float(want_obj)


@pytest.mark.parametrize("impl", IMPLS)
def test_tied_profiles_break_to_the_smallest_split(impl):
    # mean 1, centred rows ±1: D of every adjacent pair is exactly 2, singletons 0: three tied optima for k=3
    x = np.array([[0.0], [2.0], [0.0], [2.0]])
    seg = fisher_segment(x, k=3, impl=impl)
    assert seg.objective == 2.0
    assert seg.segments == [(0, 0), (1, 1), (2, 3)]  # last segment starts as early as possible


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("min_size", [1, 2, 3])
def test_constant_profiles_all_tie(impl, min_size):
    n = 12
    x = np.full((n, 5), 3.0)  # integer values: the mean is exact, every cost exactly 0
    for k in range(1, n // min_size + 1):
        seg = fisher_segment(x, k=k, min_size=min_size, impl=impl)
        assert seg.objective == 0.0
        want = [(q * min_size, q * min_size + min_size - 1) for q in range(k - 1)] + [((k - 1) * min_size, n - 1)]
        assert seg.segments == want
    auto = fisher_segment(x, k="auto", min_size=min_size, impl=impl)
    assert auto.k == 1 and auto.segments == [(0, n - 1)] and auto.k_rule == "kneedle"


def test_inexact_constant_profiles_cost_nothing():
    x = np.full((37, 4), 0.1)  # 0.1 is not representable: costs are rounding noise, clamped at >= 0
    for impl in IMPLS:
        seg = fisher_segment(x, k=4, impl=impl)
        assert 0.0 <= seg.objective <= 1e-28
    assert fisher_segment(x, k=4).segments == fisher_segment(x, k=4, impl="numpy").segments


# ------------------------------------------------------------------------------------------- degenerate


@pytest.mark.parametrize("impl", IMPLS)
def test_single_row(impl):
    seg = fisher_segment(np.array([[0.3, -1.0]]), k=1, impl=impl)
    assert seg.segments == [(0, 0)] and seg.objective == 0.0 and seg.k == 1
    assert np.array_equal(seg.objective_by_k, [0.0])
    auto = fisher_segment(np.array([[0.3, -1.0]]), k="auto", impl=impl)
    assert auto.segments == [(0, 0)] and auto.k_max == 1


@pytest.mark.parametrize("impl", IMPLS)
def test_k_equals_l_gives_singletons(impl):
    x = np.random.default_rng(2).standard_normal((10, 3))
    seg = fisher_segment(x, k=10, impl=impl)
    assert seg.segments == [(t, t) for t in range(10)] and seg.objective == 0.0
    assert np.all(np.diff(seg.objective_by_k) <= 0)  # optimal objective never grows with k


@pytest.mark.parametrize("impl", IMPLS)
def test_min_size_equal_to_l(impl):
    x = np.random.default_rng(4).standard_normal((6, 2))
    seg = fisher_segment(x, k=1, min_size=6, impl=impl)
    assert seg.segments == [(0, 5)]
    assert seg.objective == pytest.approx(direct_costs(x)[0, 5], rel=1e-12)


def test_result_helpers():
    x = np.random.default_rng(9).standard_normal((8, 2))
    seg = fisher_segment(x, k=3, k_max=5)
    assert seg.k_max == 5 and len(seg.objective_by_k) == 5 and seg.objective == seg.objective_by_k[2]
    assert seg.starts == [a for a, _ in seg.segments]
    labels = seg.labels()
    assert labels.shape == (8,) and list(np.unique(labels)) == [0, 1, 2]
    for idx, (a, b) in enumerate(seg.segments):
        assert np.all(labels[a : b + 1] == idx)


def test_accepts_float32_and_integer_profiles():
    x = np.random.default_rng(12).integers(0, 5, size=(15, 3))
    a = fisher_segment(x, k=4)
    b = fisher_segment(x.astype(np.float32), k=4)
    c = fisher_segment(x.astype(np.float64).tolist(), k=4, impl="numpy")
    assert a.segments == b.segments == c.segments and a.objective == c.objective


@pytest.mark.parametrize("n,k,min_size", [(40, 6, 1), (211, 17, 3), (300, 64, 1)])
def test_many_ties_cpp_equals_numpy(n, k, min_size):
    """Long rows of tied candidates exercise the vectorized first-minimum scan in C++ (lanes + tail)."""
    rng = np.random.default_rng(n)
    costs = np.triu(rng.integers(0, 2, size=(n, n))).astype(np.float64)
    cpp = fisher_segment_costs(costs, k=k, min_size=min_size, impl="cpp")
    ref = fisher_segment_costs(costs, k=k, min_size=min_size, impl="numpy")
    assert cpp.segments == ref.segments and np.array_equal(cpp.objective_by_k, ref.objective_by_k)
    flat = fisher_segment(np.full((n, 2), 7.0), k=k, min_size=min_size)
    want = [(q * min_size, q * min_size + min_size - 1) for q in range(k - 1)] + [((k - 1) * min_size, n - 1)]
    assert flat.segments == want


def test_accepts_torch_tensors_and_package_level_import():
    torch = pytest.importorskip("torch")
    from sglp_fast import fisher_segment as top_level

    x = np.random.default_rng(13).standard_normal((20, 4))
    want = fisher_segment(x, k=3)
    assert top_level(torch.from_numpy(x), k=3).segments == want.segments
    half = torch.from_numpy(x).to(torch.bfloat16)
    assert fisher_segment(half, k=3).segments == fisher_segment(half.double().numpy(), k=3).segments
