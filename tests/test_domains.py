"""benchmarks/domains.py: held-out texts of different kinds load offline, are long enough, share no text with
each other or the calibration text, and are cleaned deterministically."""
from __future__ import annotations

import itertools
import re
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import domains  # noqa: E402
from sglp_fast.calibration.text import builtin_text  # noqa: E402

MIN_WORDS = 2_500  # ≈ 8 windows of 256 SmolLM2 tokens, with margin
SHINGLE = 12
MAX_SHARED = 0.01  # of the smaller text's 12-word shingles


def _text(name: str) -> str:
    try:
        return domains.load_domain(name)
    except domains.MissingSource as e:
        pytest.skip(f"domain {name!r}: source not installed: {e}")


def _shingles(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return {tuple(words[i:i + SHINGLE]) for i in range(len(words) - SHINGLE + 1)}


@pytest.mark.parametrize("name", list(domains.DOMAINS))
def test_domain_loads_enough_clean_text(name):
    kind, provenance, loader = domains.DOMAINS[name]
    assert kind and provenance and callable(loader)
    text = _text(name)
    assert len(text.split()) >= MIN_WORDS, f"{name}: {len(text.split())} words"
    paras = text.split("\n\n")
    assert all(p and "\n" not in p and p == p.strip() for p in paras)  # one paragraph a line, no hard wraps
    long = [p for p in paras if len(p.split()) >= 8]
    assert len(long) == len(set(long)), f"{name}: repeated paragraphs"


def test_cleaning_is_deterministic_and_drops_markup():
    for name, (_, _, loader) in domains.DOMAINS.items():
        try:
            first = loader()
        except domains.MissingSource:
            continue
        assert loader() == first == domains.load_domain(name), name
    checks = {
        "jargon": lambda t: not re.search(r"\{[\w-]+\}|^:", t, re.M),  # {cross-reference} braces, entry headers
        "austen": lambda t: (t.startswith("It is a truth universally acknowledged") and "_" not in t
                             and not re.search(r"^Chapter \d+$", t, re.M)),  # _emphasis_, chapter headings
        "licences": lambda t: "TERMS AND CONDITIONS" not in t,  # headings
    }
    for name, ok in checks.items():
        try:
            assert ok(domains.load_domain(name)), name
        except domains.MissingSource:
            pass


def test_at_least_three_kinds_none_of_them_the_calibration_kind():
    kinds = {kind for kind, _, _ in domains.DOMAINS.values()}
    assert len(kinds) == len(domains.DOMAINS) >= 3


def test_texts_do_not_overlap_each_other_or_the_calibration_text():
    texts = {"builtin calib": builtin_text("calib"), "builtin heldout": builtin_text("heldout")}
    for name in domains.DOMAINS:
        try:
            texts[name] = domains.load_domain(name)
        except domains.MissingSource:
            pass
    if len(texts) < 3:
        pytest.skip("no domain installed; `python benchmarks/domains.py --install`")
    sets = {name: _shingles(text) for name, text in texts.items()}
    for a, b in itertools.combinations(sets, 2):
        shared = len(sets[a] & sets[b]) / max(1, min(len(sets[a]), len(sets[b])))
        assert shared <= MAX_SHARED, f"{a} and {b} share {shared:.2%} of their {SHINGLE}-word shingles"


def test_missing_source_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(domains, "CACHE", str(tmp_path))
    monkeypatch.setitem(domains._DEBS, "jargon-text", ("4.4.7-4.1", "no/such/jargon.txt.gz"))
    with pytest.raises(domains.MissingSource, match=r"--install jargon.*apt-get download jargon-text=4\.4\.7-4\.1"):
        domains.jargon_text()
    with pytest.raises(KeyError, match="known: readme"):
        domains.load_domain("nope")


def test_r_unserialize_reads_a_character_vector():
    def i32(*values):
        return struct.pack(f">{len(values)}i", *values)
    # version 3 header, then STRSXP of length 2: a UTF-8 CHARSXP "hello" and NA_character_
    buf = (b"X\n" + i32(3, 0x040201, 0x030500, 5) + b"UTF-8" + i32(16, 2)
           + i32(0x40009, 5) + b"hello" + i32(9, -1))
    assert domains._r_unserialize(buf) == ["hello", None]


def test_command_line_lists_domains_and_refuses_unknown_ones(capsys):
    assert domains.main(["readme"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("readme") and "words" in out and len(out.splitlines()) == 1
    with pytest.raises(SystemExit) as exit_:
        domains.main(["--help"])
    assert exit_.value.code == 0 and "--install" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        domains.main(["nosuch"])
    assert exit_.value.code == 2 and "unknown domain(s) nosuch" in capsys.readouterr().err
