"""Progress messages go through ``logging`` (logger ``sglp_fast.*``); ``progress=True`` makes them visible.

Why: a library must not print, but a caller who passes ``progress=True`` asked to see the memory plan and
the rates on stderr. ``shown(progress)`` attaches a stderr handler to the ``sglp_fast`` logger for the duration
of the call (records then stop there, so they are not shown twice) unless the application put a handler on
that logger itself; with ``progress=False`` records go wherever the application's logging sends them.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

PACKAGE_LOGGER = "sglp_fast"


@contextlib.contextmanager
def shown(progress: bool) -> Iterator[None]:
    """While inside: with ``progress``, INFO records of ``sglp_fast.*`` go to stderr."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    if not progress or logger.handlers:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


class _LineProgress:
    """Progress for a log file or a pipe: one line per 10% (and the last), no carriage returns."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.done, self.shown = max(int(total), 1), desc, 0, -1
        self.log = logging.getLogger(PACKAGE_LOGGER + ".progress")

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def update(self, n: int = 1) -> None:
        self.done += n
        tenth = self.done * 10 // self.total
        if tenth > self.shown:
            self.shown = tenth
            self.log.info("%s: %d/%d (%d%%)", self.desc, self.done, self.total, 100 * self.done // self.total)

    def close(self) -> None:
        pass


class _NoProgress(_LineProgress):
    def update(self, n: int = 1) -> None:
        pass


def bar(total: int, desc: str, enabled: bool):
    """A progress bar on a terminal (tqdm), one line per 10% elsewhere (a log file, a pipe), or nothing."""
    if not enabled:
        return _NoProgress(total, desc)
    if sys.stderr.isatty():
        from tqdm.auto import tqdm  # noqa: PLC0415 (only for terminals)

        return tqdm(total=total, desc=desc, leave=False)
    return _LineProgress(total, desc)
