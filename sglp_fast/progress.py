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
