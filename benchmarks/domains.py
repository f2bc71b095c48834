"""Held-out evaluation texts of different kinds, none of them the calibration text, all available offline.

The calibration text is ``builtin_text("calib")`` (Python standard-library docstrings) and the built-in held-out
text is more of the same kind, so it cannot tell whether a pruned model lost general language ability or only
the calibration domain. Each domain here is a different kind of English, from a source that a fresh Debian
machine has or gets from Debian's archive or PyPI by a pinned name, with no network at load time:

- ``readme`` (software documentation): the prose of the README long descriptions of the packages installed in
  this Python environment (``*.dist-info/METADATA``). Depends on the environment (the project's pinned deps).
- ``austen`` (narrative fiction): Jane Austen, *Pride and Prejudice* (1813, public domain; Project Gutenberg
  text), from Debian's ``r-cran-janeaustenr`` 1.0.0-1, read from its R data file without R.
- ``licences`` (legal text): free-software licences in ``/usr/share/common-licenses`` of Debian's essential
  ``base-files`` package: GPL-3, LGPL-2.1, Apache-2.0, MPL-2.0, GFDL-1.3, Artistic, CC0-1.0, BSD.
- ``jargon`` (glossary / encyclopedic entries): the Jargon File 4.4.7 (public domain), from Debian's
  ``jargon-text`` 4.4.7-4.1.

Cleaning is deterministic: paragraphs split at blank lines, hard-wrapped lines joined, headings and markup
dropped, repeated paragraphs (8+ words) kept once, source order kept. ``load_domain`` never installs anything: a
missing source raises an error naming the install command; ``ensure_installed`` (or
``python benchmarks/domains.py --install NAME...``) installs one explicitly: Debian packages are fetched with
``apt-get download`` and unpacked with ``dpkg -x`` into ``~/.cache/sglp-domains`` (no root, no dependencies:
``r-cran-janeaustenr`` would otherwise pull in all of R). Run ``apt-get update`` once on a fresh machine first.
"""
from __future__ import annotations

import functools
import glob
import gzip
import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import tempfile
import zlib
from collections import OrderedDict
from typing import Callable, NamedTuple

CACHE = os.path.expanduser(os.environ.get("SGLP_DOMAINS_CACHE", "~/.cache/sglp-domains"))
_WORD = re.compile(r"[A-Za-z]+")


class Domain(NamedTuple):
    kind: str
    provenance: str
    loader: Callable[[], str]


class MissingSource(RuntimeError):
    """The source of a domain is not on this machine; the message names the command that installs it."""


# Debian packages: package -> (pinned version, file inside the package that the loader reads).
_DEBS = {
    "r-cran-janeaustenr": ("1.0.0-1", "usr/lib/R/site-library/janeaustenr/data/Rdata.rdx"),
    "jargon-text": ("4.4.7-4.1", "usr/share/doc/jargon-text/jargon.txt.gz"),
}


def _install_hint(package: str) -> str:
    name = next(n for n, p in _PACKAGE.items() if p == package)
    return (f"`python benchmarks/domains.py --install {name}` (apt-get download {package}={_DEBS[package][0]}, "
            f"unpacked with dpkg -x into {CACHE}/{package}; run `apt-get update` first on a fresh machine)")


def _deb_file(package: str) -> str:
    """The path of the package's data file: the system's if installed, else the unpacked copy in the cache."""
    rel = _DEBS[package][1]
    for root in ("/", os.path.join(CACHE, package)):
        if os.path.isfile(os.path.join(root, rel)):
            return os.path.join(root, rel)
    raise MissingSource(f"{package} is not installed; install it with {_install_hint(package)}")


def _paragraphs(text: str, min_words: int = 8, skip: Callable[[str], bool] = lambda p: False) -> list[str]:
    """Blank-line-separated paragraphs, each joined onto one line; short, skipped or repeated ones dropped."""
    out, seen = [], set()
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        words = len(_WORD.findall(para))
        if not para or words < min_words or skip(para):
            continue
        letters = sum(c.isalpha() or c.isspace() for c in para)
        if letters < 0.8 * len(para):
            continue  # mostly symbols: an address block, a table, ASCII art
        if words >= 8:
            if para in seen:
                continue
            seen.add(para)
        out.append(para)
    return out


def readme_text() -> str:
    """Software documentation: prose paragraphs of the installed packages' README long descriptions."""
    site = sysconfig.get_paths()["purelib"]
    paras, seen = [], set()
    for path in sorted(glob.glob(os.path.join(site, "*.dist-info", "METADATA"))):
        body = open(path, encoding="utf-8", errors="ignore").read().split("\n\n", 1)
        if len(body) < 2:
            continue
        for para in re.split(r"\n\s*\n", body[1]):
            lines = para.splitlines()
            if any(ln.startswith((" ", "\t", ">>>", "```", "|", "<", "[!", "..")) for ln in lines):
                continue
            text = " ".join(ln.strip() for ln in lines)
            if len(_WORD.findall(text)) >= 8 and text not in seen:
                seen.add(text)
                paras.append(text)
    return "\n\n".join(paras)


def _r_unserialize(buf: bytes):
    """Just enough of R's XDR serialization for data files: vectors, lists, pairlists, symbols, names."""
    pos = 2 if buf[:2] == b"X\n" else 0

    def i32() -> int:
        nonlocal pos
        pos += 4
        return struct.unpack(">i", buf[pos - 4:pos])[0]

    def item():
        nonlocal pos
        flags = i32()
        kind, has_attr, has_tag = flags & 0xFF, flags & 0x200, flags & 0x400
        if kind in (241, 242, 247, 251, 252, 253, 254):  # environments, NULL, missing: nothing to keep
            return None
        if kind == 255:  # reference to an earlier symbol
            return refs[((flags >> 8) or i32()) - 1]
        if kind == 1:  # symbol
            refs.append(item())
            return refs[-1]
        if kind == 9:  # CHARSXP
            n = i32()
            if n == -1:
                return None
            pos += n
            return buf[pos - n:pos].decode("utf-8", "replace")
        if kind == 2:  # pairlist: [(tag, value), ...]
            if has_attr:
                item()
            tag = item() if has_tag else None
            car = item()
            return [(tag, car)] + (item() or [])
        if kind in (10, 13, 14, 16, 19):  # logical, integer, double, character, list
            n = i32()
            if kind in (10, 13, 14):
                fmt, size = ("d", 8) if kind == 14 else ("i", 4)
                out = list(struct.unpack(f">{n}{fmt}", buf[pos:pos + size * n]))
                pos += size * n
            else:
                out = [item() for _ in range(n)]
            names = dict(item()).get("names") if has_attr else None
            return dict(zip(names, out)) if names else out
        raise ValueError(f"unsupported R serialization type {kind}")

    refs: list = []
    version = i32()
    i32(), i32()
    if version == 3:
        n = i32()
        pos += n  # native encoding name
    return item()


def austen_text() -> str:
    """Narrative fiction: *Pride and Prejudice*, paragraphs in order, chapter headings and _emphasis_ marks dropped."""
    rdx = _deb_file("r-cran-janeaustenr")
    index = _r_unserialize(gzip.decompress(open(rdx, "rb").read()))
    offset, length = (int(v) for v in index["variables"]["prideprejudice"])
    with open(rdx[:-1] + "b", "rb") as f:  # Rdata.rdb: 4-byte length, then the zlib-compressed object
        f.seek(offset)
        lines = _r_unserialize(zlib.decompress(f.read(length)[4:]))
    text = "\n".join(lines).replace("_", "")
    heading = re.compile(r"(Chapter \d+|PRIDE AND PREJUDICE|By Jane Austen)$")
    return "\n\n".join(_paragraphs(text, min_words=1, skip=heading.match))


_LICENCES = ("GPL-3", "LGPL-2.1", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "Artistic", "CC0-1.0", "BSD")


def _caps_heading(para: str) -> bool:
    return para.upper() == para and not para.endswith(".")  # ALL-CAPS disclaimers end with "." and stay


def licence_text() -> str:
    """Legal text: the licences of /usr/share/common-licenses, in a fixed order, headings dropped."""
    paras = []
    for name in _LICENCES:
        path = os.path.join("/usr/share/common-licenses", name)
        if not os.path.isfile(path):
            raise MissingSource(f"{path} is missing (Debian's base-files package ships it); "
                                "`apt-get install --reinstall -y base-files`")
        paras += _paragraphs(open(path, encoding="utf-8").read(), skip=_caps_heading)
    return "\n\n".join(dict.fromkeys(paras))


def jargon_text() -> str:
    """Glossary: the Jargon File's entries and essays; entry headers (:term: pron.), {cross-ref} braces dropped."""
    raw = gzip.decompress(open(_deb_file("jargon-text"), "rb").read()).decode("utf-8")
    raw = re.sub(r"\{+([^{}]*)\}+", r"\1", raw)
    return "\n\n".join(_paragraphs(raw, skip=lambda p: p.startswith(":")))


DOMAINS: "OrderedDict[str, Domain]" = OrderedDict([
    ("readme", Domain("software documentation",
                      "README long descriptions (*.dist-info/METADATA) of the packages installed in this venv",
                      readme_text)),
    ("austen", Domain("narrative fiction",
                      "Jane Austen, Pride and Prejudice (1813, public domain), Debian r-cran-janeaustenr 1.0.0-1",
                      austen_text)),
    ("licences", Domain("legal / licence text",
                        "/usr/share/common-licenses/{" + ",".join(_LICENCES) + "}, Debian base-files",
                        licence_text)),
    ("jargon", Domain("glossary / encyclopedic entries",
                      "The Jargon File 4.4.7 (public domain), Debian jargon-text 4.4.7-4.1",
                      jargon_text)),
])
_PACKAGE = {"austen": "r-cran-janeaustenr", "jargon": "jargon-text"}


@functools.lru_cache(maxsize=None)
def load_domain(name: str) -> str:
    """The cleaned text of domain ``name``; raises MissingSource (naming the install command) if absent."""
    if name not in DOMAINS:
        raise KeyError(f"unknown domain {name!r}; known: {', '.join(DOMAINS)}")
    return DOMAINS[name].loader()


def ensure_installed(name: str) -> None:
    """Install the pinned source of domain ``name`` if it is missing (explicit: load_domain never calls this).

    Debian packages: ``apt-get download PKG=VERSION`` into a temporary folder and ``dpkg -x`` into
    ``CACHE/PKG``; no root needed, no dependencies pulled. ``readme`` and ``licences`` need nothing.
    """
    package = _PACKAGE.get(name)
    if package is None:
        return
    try:
        _deb_file(package)
        return
    except MissingSource:
        pass
    version = _DEBS[package][0]
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run(["apt-get", "download", f"{package}={version}"], cwd=tmp, capture_output=True, text=True)
        debs = glob.glob(os.path.join(tmp, "*.deb"))
        if got.returncode or not debs:
            raise MissingSource(f"apt-get download {package}={version} failed ({got.stderr.strip()[-300:]}); "
                                "run `apt-get update` first, or check that Debian still serves this version")
        dest = os.path.join(CACHE, package)
        shutil.rmtree(dest + ".part", ignore_errors=True)
        os.makedirs(CACHE, exist_ok=True)
        subprocess.run(["dpkg", "-x", debs[0], dest + ".part"], check=True)
        shutil.rmtree(dest, ignore_errors=True)  # an incomplete earlier copy
        os.replace(dest + ".part", dest)  # whole or not at all
    _deb_file(package)


def main(argv: list[str] | None = None) -> int:
    import argparse  # noqa: PLC0415

    p = argparse.ArgumentParser(description="List the held-out text domains (words, provenance); --install "
                                            "fetches the Debian ones first (no root).")
    p.add_argument("names", nargs="*", metavar="DOMAIN", help=f"domains to show (default: all of {', '.join(DOMAINS)})")
    p.add_argument("--install", action="store_true", help="download and unpack the Debian text packages first")
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in DOMAINS]
    if unknown:
        p.error(f"unknown domain(s) {', '.join(unknown)}; choose from {', '.join(DOMAINS)}")
    for n in args.names or list(DOMAINS):
        if args.install:
            ensure_installed(n)
        text = load_domain(n)
        print(f"{n:9s} {DOMAINS[n].kind:32s} {len(text.split()):>7d} words  {DOMAINS[n].provenance}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
