"""Calibration and evaluation text: where it comes from and how it is cut into token windows.

Windowing (the same for calibration, ``sglp eval`` and ``sglp compare``): a source is tokenized as ONE
stream with the model's tokenizer and its default special-token behaviour (so a BOS appears at token 0 only
if the tokenizer itself adds one to a stream; nothing is inserted between documents), then cut into
``n_seqs`` consecutive, non-overlapping windows of ``seq_len`` tokens starting at token 0. Window i holds
stream tokens ``[i*seq_len, (i+1)*seq_len)``; leftover tokens are ignored. Fewer than ``n_seqs*seq_len``
tokens is an error (never silent padding or repetition).

Sources (``--calib`` / ``calib=``):
- ``"builtin"`` (default) and ``"builtin:heldout"``: real English generated at run time from the docstrings
  of a fixed list of Python standard-library modules, so no network or data set is needed. Modules are
  assigned to the calibration or the held-out portion by a fixed rule, and paragraphs are de-duplicated
  across both, so the two portions share no paragraph. The text depends only on the Python version.
- a path ending in ``.jsonl``: one JSON object per line; the ``text_field`` of each is joined with a blank line.
- any other existing file: read as UTF-8 text.
- ``"hf:NAME[:CONFIG][@SPLIT]"``: a Hugging Face ``datasets`` data set (needs the package and the network);
  its ``text`` column (``text_field``) is joined with a blank line.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import json
import os
import re
import warnings
import zlib
from collections.abc import Sequence
from typing import Any

import torch

from ..checks import check_int

BUILTIN = "builtin"
BUILTIN_HELDOUT = "builtin:heldout"

# Pure-Python standard-library modules with long, prose-like docstrings and no import side effects.
# The list is fixed (not discovered) so the text is reproducible for a given Python version.
_STDLIB_MODULES = (
    "abc", "argparse", "ast", "asyncio.base_events", "asyncio.events", "asyncio.futures", "asyncio.locks",
    "asyncio.queues", "asyncio.streams", "asyncio.tasks", "base64", "bdb", "bisect", "calendar", "cmd",
    "code", "codecs", "collections", "concurrent.futures._base", "configparser", "contextlib", "copy",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "dis", "doctest", "email.message",
    "email.parser", "email.utils", "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib",
    "functools", "getopt", "gettext", "glob", "graphlib", "gzip", "heapq", "hmac", "html.parser",
    "http.client", "http.cookiejar", "http.server", "imaplib", "importlib.abc", "importlib.metadata",
    "inspect", "ipaddress", "json", "json.decoder", "json.encoder", "locale", "logging",
    "logging.handlers", "lzma", "mailbox", "mimetypes", "multiprocessing.pool", "netrc", "numbers",
    "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "platform",
    "plistlib", "poplib", "pprint", "pydoc", "queue", "quopri", "random", "re", "reprlib", "sched",
    "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver",
    "sqlite3", "statistics", "string", "subprocess", "sysconfig", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "trace", "traceback", "tracemalloc", "types", "typing",
    "unittest.case", "unittest.mock", "urllib.parse", "urllib.request", "uuid", "warnings", "wave",
    "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "xml.sax.handler", "zipfile", "zoneinfo",
)
# One module in _HELDOUT_EVERY goes to the held-out portion (by a stable CRC of its name, not hash()).
_HELDOUT_EVERY = 5


def _is_heldout_module(name: str) -> bool:
    return zlib.crc32(name.encode()) % _HELDOUT_EVERY == 0


def _docstrings_of(module: Any) -> list[str]:
    """Module, class, function and method docstrings defined in ``module``, in name order (not inherited)."""
    docs = [module.__doc__]
    for name in sorted(vars(module)):
        obj = vars(module)[name]
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        docs.append(obj.__doc__)
        if inspect.isclass(obj):
            for attr in sorted(vars(obj)):
                member = vars(obj)[attr]
                if inspect.isfunction(member):
                    docs.append(member.__doc__)
    return [inspect.cleandoc(d) for d in docs if isinstance(d, str) and d.strip()]


_WORD = re.compile(r"[A-Za-z]+")


def _prose_paragraphs(doc: str) -> list[str]:
    """Paragraphs that read as English prose, each reflowed onto one line (code, tables, lists dropped)."""
    out = []
    for para in re.split(r"\n\s*\n", doc):
        lines = para.splitlines()
        if any(ln.startswith((" ", "\t", ">>>", "...", "-", "*", "|", "=", "+")) for ln in lines):
            continue  # doctest, indented code, bullet list, table, rule
        text = " ".join(ln.strip() for ln in lines)
        words = _WORD.findall(text)
        if len(words) < 8 or not text.endswith((".", ":", "?", "!")):
            continue
        letters = sum(c.isalpha() or c.isspace() for c in text)
        if letters < 0.85 * len(text):
            continue  # mostly symbols: a signature or a format string
        out.append(text)
    return out


@functools.lru_cache(maxsize=2)
def builtin_text(portion: str = "calib") -> str:
    """The built-in English text: ``portion`` "calib" (calibration) or "heldout" (evaluation), disjoint."""
    if portion not in ("calib", "heldout"):
        raise ValueError(f"portion: expected 'calib' or 'heldout', got {portion!r}")
    seen: set[str] = set()
    chosen: list[str] = []
    for name in _STDLIB_MODULES:
        with warnings.catch_warnings():  # deprecated aliases (typing.io, ...) warn when touched
            warnings.simplefilter("ignore")
            try:
                module = importlib.import_module(name)
            except ImportError:  # a stripped-down Python without e.g. sqlite3: skip, the rest is plenty
                continue
            docs = _docstrings_of(module)
        for doc in docs:
            for para in _prose_paragraphs(doc):
                if para in seen:
                    continue  # de-duplication spans both portions, so they never share a paragraph
                seen.add(para)
                if _is_heldout_module(name) == (portion == "heldout"):
                    chosen.append(para)
    return "\n\n".join(chosen)


def load_text(source: str, text_field: str = "text") -> str:
    """The raw text of a calibration/evaluation source (see the module docstring for the forms)."""
    if not isinstance(source, str):
        raise TypeError(f"source: expected a str (a path, 'builtin', or 'hf:NAME'), got {type(source).__name__}")
    if source == BUILTIN:
        return builtin_text("calib")
    if source == BUILTIN_HELDOUT:
        return builtin_text("heldout")
    if source.startswith("hf:"):
        return _load_hf_dataset(source[3:], text_field)
    check_text_source(source)
    return _read_file(source, text_field)


def _read_file(source: str, text_field: str, name: str = "calib") -> str:
    """The text of a file source: a .jsonl file's records (``text_field``), else the file as UTF-8."""
    try:
        if source.endswith(".jsonl"):
            return _load_jsonl(source, text_field, name)
        with open(source, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{name}: {source} is not UTF-8 text (byte {e.object[e.start]:#04x} at position {e.start}); "
                         f"convert it first, e.g. `iconv -f latin1 -t utf-8 {source} > out.txt`") from None
    except OSError as e:
        raise ValueError(f"{name}: cannot read {source} ({e.strerror or e}); pass a readable file") from None


def check_text_source(source: str, name: str = "calib", text_field: str | None = None) -> None:
    """Refuse, before anything is loaded, a source that is neither a readable file nor a known name. With
    ``text_field``, a file's content too (UTF-8, every JSONL record holding the field, some text in it), so that
    a bad file is refused before the model loads, with ``name`` (the flag) in the message."""
    if source in (BUILTIN, BUILTIN_HELDOUT) or (isinstance(source, str) and source.startswith("hf:")):
        return
    if not isinstance(source, str) or not os.path.isfile(source):
        raise ValueError(
            f"{name}: {source!r} is not a file, 'builtin', 'builtin:heldout' or 'hf:NAME[:CONFIG][@SPLIT]'; "
            "pass an existing text/JSONL file or one of those names"
        )
    if not os.access(source, os.R_OK):
        raise ValueError(f"{name}: cannot read {source!r} (permission denied); pass a readable file")
    if text_field is not None and not _read_file(source, text_field, name).strip():
        raise ValueError(f"{name}: {source!r} holds no text (empty, or only blank records); pass a file with text")


def _load_jsonl(path: str, text_field: str, name: str = "calib") -> str:
    texts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{name}: {path} line {lineno} is not valid JSON ({e.msg}); "
                                 "a .jsonl file needs one JSON object per line") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ValueError(f"{name}: {path} line {lineno} has no string field {text_field!r}; "
                                 f"pass --text-field with the name of the field that holds the text")
            texts.append(record[text_field])
    return "\n\n".join(texts)


def _load_hf_dataset(spec: str, text_field: str) -> str:
    try:
        import datasets  # noqa: PLC0415  (optional and heavy)
    except ImportError:
        raise ValueError(f"calib: 'hf:{spec}' needs the `datasets` package, which is not installed; "
                         "`pip install datasets`, or pass a local text/JSONL file or 'builtin'") from None
    spec, _, split = spec.partition("@")
    name, _, config = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as e:  # network, unknown name, ...: say so, don't fall back to another text silently
        raise ValueError(f"calib: could not load the Hugging Face data set {name!r} "
                         f"(config {config or None!r}, split {split or 'train'!r}): {e}. "
                         "It needs the network; pass a local text/JSONL file or 'builtin' instead") from e
    if text_field not in ds.column_names:
        raise ValueError(f"calib: data set {name!r} has columns {ds.column_names}, no {text_field!r}; "
                         "pass --text-field")
    return "\n\n".join(t for t in ds[text_field] if t)


def tokenize_windows(tokenizer: Any, text: str, n_seqs: int, seq_len: int, source: str | None = None) -> torch.Tensor:
    """``n_seqs`` consecutive non-overlapping windows of ``seq_len`` tokens from the stream ``text``: [n, s].

    Only a prefix of the text long enough for the windows (plus a margin, grown until it suffices) is
    tokenized; the margin makes the kept tokens identical to tokenizing the whole stream, because a token
    boundary never depends on text hundreds of tokens later.
    """
    n_seqs, seq_len = check_int("n_seqs", n_seqs, 1), check_int("seq_len", seq_len, 1)
    need = n_seqs * seq_len
    margin = 64
    chars = (need + margin) * 6
    while True:
        prefix = text[:chars]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ids = _encode(tokenizer, prefix)
        if len(ids) >= need + margin or chars >= len(text):
            break
        chars *= 2
    if len(ids) < need:
        what = "the text" if source is None else repr(source)
        raise ValueError(
            f"calib: {what} has {len(ids)} tokens, fewer than n_seqs*seq_len = {n_seqs}*{seq_len} = {need}; "
            "lower --calib-seqs (--eval-seqs for perplexity) or --seq-len, or pass a longer text"
        )
    return torch.tensor(ids[:need], dtype=torch.long).view(n_seqs, seq_len)


def _encode(tokenizer: Any, text: str) -> list[int]:
    # verbose=False: the stream is longer than model_max_length on purpose (it is cut into windows next).
    try:
        out = tokenizer(text, truncation=False, verbose=False)
    except TypeError:
        out = tokenizer(text)
    ids = out["input_ids"]
    return list(ids)


@dataclasses.dataclass
class CalibrationData:
    """Token windows plus where they came from (the provenance the plan records)."""

    input_ids: torch.Tensor  # [n_seqs, seq_len] long
    source: str
    seed: int = 0

    @property
    def n_seqs(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def tokens(self) -> int:
        return self.n_seqs * self.seq_len

    def batches(self, windows_per_batch: int = 1) -> list[dict[str, torch.Tensor]]:
        """Minibatches for ``calibrate``; one window each by default (one CKA minibatch per window)."""
        windows_per_batch = check_int("windows_per_batch", windows_per_batch, 1)
        return [{"input_ids": self.input_ids[i:i + windows_per_batch]}
                for i in range(0, self.n_seqs, windows_per_batch)]

    def provenance(self) -> dict[str, Any]:
        return {"source": self.source, "n_seqs": self.n_seqs, "seq_len": self.seq_len,
                "tokens": self.tokens, "seed": self.seed, "windowing": "consecutive-non-overlapping-from-0"}


def load_calibration(source: str | Sequence[str] | torch.Tensor | CalibrationData | None, tokenizer: Any,
                     n_seqs: int = 16, seq_len: int = 256, seed: int = 0,
                     text_field: str = "text") -> CalibrationData:
    """Windows from a source spec (None = 'builtin'), a list of texts (joined by a blank line), or token ids."""
    if isinstance(source, CalibrationData):
        return source
    if isinstance(source, torch.Tensor):
        if source.dtype != torch.long or source.dim() != 2:
            raise ValueError(f"calib: a tensor must be int64 [n_seqs, seq_len], got {source.dtype} "
                             f"{tuple(source.shape)}")
        return CalibrationData(source, source="tensor", seed=seed)
    if source is None:
        source = BUILTIN
    if tokenizer is None:
        raise ValueError("tokenizer: calibration text needs the model's tokenizer, got None; "
                         "pass tokenizer=... or a model path/dir that ships one")
    if isinstance(source, str):
        text, name = load_text(source, text_field), source
    elif isinstance(source, Sequence) and all(isinstance(t, str) for t in source):
        text, name = "\n\n".join(source), f"texts[{len(source)}]"
    else:
        raise TypeError(f"calib: expected a source string, a list of str, a token tensor or CalibrationData, "
                        f"got {type(source).__name__}")
    return CalibrationData(tokenize_windows(tokenizer, text, n_seqs, seq_len, source=name), source=name, seed=seed)
