"""Bad input to the segmentation: ValueError/TypeError naming the argument, in Python and in the C++ core;
a clear build hint when the extension is missing."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from sglp_fast.segmentation.fisher import fisher_segment, fisher_segment_costs, knee_k

GOOD = np.random.default_rng(0).standard_normal((6, 3))
IMPLS = ("cpp", "numpy")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "profiles,kwargs,exc,words",
    [
        (np.zeros(6), {"k": 2}, ValueError, ["profiles", "2-D", "(6,)"]),
        (np.zeros((2, 3, 4)), {"k": 2}, ValueError, ["profiles", "2-D", "(2, 3, 4)"]),
        (np.zeros((0, 3)), {"k": 1}, ValueError, ["profiles", "non-empty", "(0, 3)"]),
        (np.zeros((4, 0)), {"k": 1}, ValueError, ["profiles", "non-empty", "(4, 0)"]),
        (np.where(np.eye(6, 3) > 0, np.nan, GOOD), {"k": 2}, ValueError, ["profiles", "finite", "nan"]),
        (np.where(np.eye(6, 3) > 0, -np.inf, GOOD), {"k": 2}, ValueError, ["profiles", "finite", "inf"]),
        (GOOD * 1e200, {"k": 2}, ValueError, ["profiles", "rescale"]),
        (np.array([["a", "b"]]), {"k": 1}, TypeError, ["profiles", "real numbers", "<U1"]),
        (GOOD.astype(complex), {"k": 1}, TypeError, ["profiles", "complex"]),
        (GOOD > 0, {"k": 1}, TypeError, ["profiles", "bool"]),
        (GOOD, {"k": 0}, ValueError, ["k", ">= 1", "got 0"]),
        (GOOD, {"k": -3}, ValueError, ["k", ">= 1", "got -3"]),
        (GOOD, {"k": 7}, ValueError, ["k", "L = 6", "got 7"]),
        (GOOD, {"k": 4, "min_size": 2}, ValueError, ["k", "min_size", "k <= 3"]),
        (GOOD, {"k": 2.0}, TypeError, ["k", "integer", "2.0"]),
        (GOOD, {"k": True}, TypeError, ["k", "integer", "True"]),
        (GOOD, {"k": "elbow"}, ValueError, ["k", "'auto'", "'elbow'"]),
        (GOOD, {"k": 3, "k_max": 2}, ValueError, ["k_max", ">= k = 3", "got 2"]),
        (GOOD, {"k": 2, "k_max": 4, "min_size": 2}, ValueError, ["k_max", "min_size", "k_max <= 3"]),
        (GOOD, {"k": "auto", "k_max": 0}, ValueError, ["k_max", ">= 1", "got 0"]),
        (GOOD, {"k": 1, "min_size": 0}, ValueError, ["min_size", ">= 1", "got 0"]),
        (GOOD, {"k": 1, "min_size": 7}, ValueError, ["min_size", "L = 6", "got 7"]),
        (GOOD, {"k": 1, "min_size": 1.5}, TypeError, ["min_size", "integer"]),
        (GOOD, {"k": 2, "threads": 0}, ValueError, ["threads", ">= 1", "got 0"]),
    ],
)
def test_fisher_segment_rejects(impl, profiles, kwargs, exc, words):
    with pytest.raises(exc) as info:
        fisher_segment(profiles, impl=impl, **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_bad_impl_named():
    with pytest.raises(ValueError, match=r"impl: expected 'cpp' or 'numpy', got 'cuda'"):
        fisher_segment(GOOD, k=2, impl="cuda")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "costs,kwargs,words",
    [
        (np.zeros((3, 4)), {"k": 1}, ["costs", "square", "(3, 4)"]),
        (np.zeros(4), {"k": 1}, ["costs", "2-D"]),
        (np.zeros((0, 0)), {"k": 1}, ["costs", "non-empty"]),
        (np.triu(np.full((4, 4), np.nan)), {"k": 2}, ["costs", "finite", "(0, 0)"]),
        (np.zeros((4, 4)), {"k": 5}, ["k", "L = 4"]),
        (np.triu(np.full((3, 3), 1e308)), {"k": 3}, ["costs", "overflowed", "k = 2"]),
    ],
)
def test_fisher_segment_costs_rejects(impl, costs, kwargs, words):
    with pytest.raises(ValueError) as info:
        fisher_segment_costs(costs, impl=impl, **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_cpp_core_validates_on_its_own():
    """The C++ entry points check their input too (std::invalid_argument -> ValueError)."""
    from sglp_fast import _fisher

    cases = [
        (lambda: _fisher.fisher_dp_profiles(np.full((3, 2), np.nan), 1), ["profiles", "finite", "row 0"]),
        (lambda: _fisher.fisher_dp_profiles(np.zeros(5), 1), ["profiles", "2-D"]),
        (lambda: _fisher.fisher_dp_profiles(np.zeros((0, 2)), 1), ["profiles", "non-empty"]),
        (lambda: _fisher.fisher_dp_profiles(GOOD, 4, 2), ["k_max", "min_size"]),
        (lambda: _fisher.fisher_dp_profiles(GOOD, 0), ["k_max", ">= 1"]),
        (lambda: _fisher.fisher_dp_profiles(GOOD, 1, 0), ["min_size", ">= 1"]),
        (lambda: _fisher.fisher_dp_profiles(GOOD, 1, 1, -1), ["threads"]),
        (lambda: _fisher.fisher_dp_costs(np.zeros((2, 3)), 1), ["costs", "square"]),
        (lambda: _fisher.fisher_dp_costs(np.triu(np.full((3, 3), np.inf)), 1), ["costs", "finite"]),
        (lambda: _fisher.segment_costs(np.array([[1.0, np.inf]])), ["profiles", "finite", "column 1"]),
        (lambda: _fisher.backtrack(np.zeros((2, 3), dtype=np.int64), 3), ["k", "k_max = 2"]),
    ]
    for call, words in cases:
        with pytest.raises(ValueError) as info:
            call()
        for word in words:
            assert word in str(info.value), (word, str(info.value))


def test_missing_extension_says_how_to_build(monkeypatch):
    import sglp_fast

    monkeypatch.setitem(sys.modules, "sglp_fast._fisher", None)  # makes `from . import _fisher` fail
    monkeypatch.delattr(sglp_fast, "_fisher", raising=False)
    with pytest.raises(ImportError, match=r"bootstrap\.sh.*--no-build-isolation -e \..*impl='numpy'"):
        fisher_segment(GOOD, k=2)
    with pytest.raises(ImportError, match="bootstrap.sh"):
        fisher_segment_costs(np.zeros((3, 3)), k=2)
    assert fisher_segment(GOOD, k=2, impl="numpy").k == 2  # the spec needs no compiled code


def test_knee_k_rejects_bad_curves():
    for bad in ([], [[1.0, 2.0]], [1.0, np.nan]):
        with pytest.raises(ValueError, match="objective_by_k"):
            knee_k(bad)
