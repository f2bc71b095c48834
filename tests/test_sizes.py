"""``sglp_fast.sizes``: the one byte-size parser behind ``max_memory=``/``max_cpu_memory=`` and ``--max-memory``."""
from __future__ import annotations

import numpy as np
import pytest

from sglp_fast.cli import build_parser, parse_size
from sglp_fast.sizes import fmt_bytes, parse_bytes, size_from_text

GiB, MiB = 2**30, 2**20


@pytest.mark.parametrize("text,expected", [
    ("1e9", 10**9), ("1.5e9", 1_500_000_000), ("1E9", 10**9), ("2e+3", 2000), ("123", 123), ("1.5 GB", 1_500_000_000),
    ("8G", 8 * 10**9), ("8GB", 8 * 10**9), ("8gb", 8 * 10**9), ("500M", 500 * 10**6), ("500MB", 500 * 10**6),
    ("4k", 4000), ("4kB", 4000), ("2T", 2 * 10**12), ("7B", 7), ("7b", 7),
    ("8Gi", 8 * GiB), ("8GiB", 8 * GiB), ("8gib", 8 * GiB), ("512Mi", 512 * MiB), ("512mib", 512 * MiB),
    ("1Ki", 1024), ("1KiB", 1024), ("1Ti", 2**40), ("0.5GiB", GiB // 2), (" 8 GiB ", 8 * GiB), (".5k", 500),
])
def test_sizes_as_people_write_them(text, expected):
    assert size_from_text(text) == expected
    assert parse_bytes(text, "max_memory") == expected
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "", "GiB", "-1", "1e", "8 GiBs", "8 iB", "8Gb/s", "1,000", "nan", "inf",
                                  "0x10", "8 G i B"])
def test_garbage_is_refused_naming_the_argument_and_the_fix(text):
    with pytest.raises(ValueError) as info:
        parse_bytes(text, "max_cpu_memory")
    message = str(info.value)
    assert message.startswith(f"max_cpu_memory: cannot parse {text!r}")
    assert "8GiB" in message and "1e9" in message and "8G = 8GB" in message


def test_cli_flag_error_names_the_flag(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["analyze", "--max-memory", "lots"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --max-memory: cannot parse 'lots'" in err and "8GiB" in err
    assert build_parser().parse_args(["analyze", "--max-memory", "1.5e9"]).max_memory == 1_500_000_000
    assert build_parser().parse_args(["analyze", "--max-memory", "8Gi"]).max_memory == 8 * GiB


def test_numbers_and_none():
    assert parse_bytes(None, "x") is None
    assert parse_bytes(0, "x") == 0
    assert parse_bytes(np.int64(5), "x") == 5 and type(parse_bytes(np.int64(5), "x")) is int
    with pytest.raises(ValueError, match="x: expected a non-negative byte count, got -1"):
        parse_bytes(-1, "x")
    for bad in (True, 1.5, 1e9, [1]):
        with pytest.raises(TypeError, match=r"x: expected bytes as an int or a string like '8GiB'"):
            parse_bytes(bad, "x")


def test_fmt_bytes():
    assert fmt_bytes(512) == "512 B" and fmt_bytes(1536) == "1.5 KiB" and fmt_bytes(8 * GiB) == "8.0 GiB"
    assert fmt_bytes(3 * 2**50) == "3072.0 TiB"


@pytest.mark.parametrize("n", [0, 1, 1023, 1024, 1025, 8 * GiB + 1, int(8.04 * GiB), 10**15 + 7, 12345])
def test_fmt_bytes_rounded_up_is_never_below_the_figure(n):
    """A budget the user is told to pass ("at least X") must be enough when passed back as printed."""
    up = fmt_bytes(n, round_up=True)
    assert size_from_text(up.replace(" ", "")) >= n, up
    assert size_from_text(fmt_bytes(n).replace(" ", "")) <= size_from_text(up.replace(" ", ""))
