"""The typed seams of the selection stage: what the verified search and the compensation fit ask of a verifier.

``verifier.SkipVerifier`` implements both; tests substitute fakes with the same signatures
(tests/test_verified.py checks them against these protocols).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Verifier(Protocol):
    """The real calibration loss of candidate plans (the verified search's judge)."""

    @property
    def num_windows(self) -> int:
        """Windows the loss is checked on."""

    @property
    def block_forwards(self) -> float:
        """Work spent so far, in block-forwards over the whole calibration set."""

    @property
    def plain_checks(self) -> str:
        """Which candidates the compensated search also checks plain: "band" or "all"
        (``verified.checked_variants``)."""

    def losses(self, plans: Sequence[Iterable[int]], compensated: bool = False, all_windows: bool = False,
               maps: Sequence[Iterable[int] | None] | None = None, policy: Any = None) -> list[float]:
        """Mean check loss of each plan (a set of removed blocks), optionally compensated (cross-fitted)."""

    def batch_losses(self, plans: Sequence[Iterable[int]], compensated: bool = False,
                     all_windows: bool = False, maps: Sequence[Iterable[int] | None] | None = None,
                     policy: Any = None) -> list[list[float]]:
        """Each plan's mean loss per check batch."""

    def prepare(self, plans: Iterable[Iterable[int]], policy: Any = None) -> None:
        """Gather the compensation statistics of every run of ``plans`` in one pass."""

    def map_choices(self, removed: Iterable[int], policy: Any = None) -> dict[int, Any]:
        """{block before a run: its regularization (``regularization.MapChoice``)}."""

    def map_blocks(self, removed: Iterable[int], policy: Any = None) -> frozenset[int]:
        """The blocks the held-out folds give a map."""

    def transforms(self, removed: Iterable[int], fold: int | None = None, maps: Iterable[int] | None = None,
                   policy: Any = None) -> dict[int, torch.Tensor]:
        """The compensation maps of a plan (fitted without fold ``fold``; None: on every window)."""

    def run_distances(self, n: int) -> Any:
        """Mean angular distance over every check token between the input and the output of each run of
        ``n`` blocks (index: its first block), from the dense states the check holds (no forward)."""


@runtime_checkable
class BlockRunner(Protocol):
    """Dense block inputs and blocks to re-run them through (what ``run_statistics.accumulate`` streams)."""

    adapter: Any

    def cached_input(self, layer: int, batch: int) -> torch.Tensor:
        """The dense model's input of block ``layer`` for kept batch ``batch``."""

    def token_mask(self, batch: int) -> torch.Tensor:
        """Which tokens of kept batch ``batch`` are real (not padding)."""

    def block(self, layer: int, transform: torch.Tensor | None = None,
              next_layer: int | None = None) -> AbstractContextManager[nn.Module]:
        """Block ``layer`` on the device, with ``transform`` folded into its MLP output projection;
        ``next_layer``: the block the caller reads next (a read-ahead hint)."""

    def call(self, block: nn.Module, layer: int, hidden: torch.Tensor, batch: int) -> torch.Tensor:
        """Run ``block`` on ``hidden`` with kept batch ``batch``'s call arguments."""
