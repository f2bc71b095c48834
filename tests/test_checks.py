"""``sglp_fast.checks``: one message form for every bad argument, ``name: expected <what>, got <value>[; fix]``."""
from __future__ import annotations

import numpy as np
import pytest

from sglp_fast.checks import check_choice, check_int, check_optional_bool, is_int


def test_is_int():
    for good in (0, -3, 10**30, np.int64(4), np.int32(-1), np.uint8(7)):
        assert is_int(good), good
    for bad in (True, False, np.bool_(True), 1.0, np.float64(2), "3", None, [1]):
        assert not is_int(bad), bad


@pytest.mark.parametrize("value", [1, 5, np.int64(3), np.uint16(9)])
def test_check_int_accepts_and_returns_a_python_int(value):
    out = check_int("n", value, 1, 9)
    assert out == value and type(out) is int


@pytest.mark.parametrize("value,minimum,maximum,message", [
    (0, 1, None, "n: expected a positive int, got 0"),
    (-1, 0, None, "n: expected a non-negative int, got -1"),
    (2, 3, None, "n: expected an int >= 3, got 2"),
    (10, 0, 9, "n: expected an int in [0, 9], got 10"),
    (-1, 0, 9, "n: expected an int in [0, 9], got -1"),
    (1.0, 1, None, "n: expected a positive int, got 1.0"),
    ("2", None, None, "n: expected an int, got '2'"),
    (True, 0, None, "n: expected a non-negative int, got True"),
    (np.bool_(False), 0, None, "n: expected a non-negative int, got "),
    (None, 1, None, "n: expected a positive int, got None"),
])
def test_check_int_rejects_with_the_message(value, minimum, maximum, message):
    with pytest.raises(ValueError) as info:
        check_int("n", value, minimum, maximum)
    assert str(info.value).startswith(message), str(info.value)


def test_check_int_bounds_are_inclusive_and_optional():
    assert check_int("n", 0, 0, 0) == 0
    assert check_int("n", -(10**12)) == -(10**12)  # no bounds: any int
    assert check_int("n", 10**12, maximum=10**12) == 10**12
    with pytest.raises(ValueError, match=r"n: expected an int, got 3.5"):
        check_int("n", 3.5)
    with pytest.raises(ValueError, match=r"expected an int in \[2, 4\], got 5"):
        check_int("n", 5, 2, 4)


def test_check_int_expected_fix_and_optional():
    with pytest.raises(ValueError) as info:
        check_int("k_max", 0, 1, expected="an int >= 1 (segments)", fix="pass k_max=None for the default")
    assert str(info.value) == "k_max: expected an int >= 1 (segments), got 0; pass k_max=None for the default"
    assert check_int("k_max", None, 1, optional=True) is None
    with pytest.raises(ValueError, match=r"^k_max: expected a positive int or None, got 0$"):
        check_int("k_max", 0, 1, optional=True)
    with pytest.raises(ValueError, match=r"^k_max: expected a positive int, got None$"):
        check_int("k_max", None, 1)


def test_check_choice():
    assert check_choice("impl", "cpp", ("cpp", "numpy")) == "cpp"
    assert check_choice("impl", "numpy", {"cpp": 1, "numpy": 2}) == "numpy"
    with pytest.raises(ValueError, match=r"^impl: expected one of \('cpp', 'numpy'\), got 'cuda'$"):
        check_choice("impl", "cuda", ["cpp", "numpy"])


def test_check_optional_bool():
    for value in (True, False, None):
        assert check_optional_bool("greedy", value, "decide by compensation") is value
    for bad in (1, 0, "yes", np.bool_(True)):
        with pytest.raises(ValueError, match=r"^greedy: expected True, False or None \(decide by compensation\), "):
            check_optional_bool("greedy", bad, "decide by compensation")
