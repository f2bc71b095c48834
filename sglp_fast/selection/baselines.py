"""Layer-removal baselines that ``sglp compare`` puts next to SGLP, all from the same calibration pass.

- ``shortgpt``: Men et al. 2024 (ShortGPT): remove the n blocks with the lowest Block Influence
  (mean 1 - cos(h_in, h_out)), over the whole depth (no segments).
- ``angular``: Gromov et al. 2024 ("The unreasonable ineffectiveness of the deeper layers"): remove the
  contiguous run of n blocks l*..l*+n-1 whose input h(l*) and output h(l*+n) are closest in angular
  distance arccos(cos)/pi on the last token of each sequence, averaged over sequences.
- ``last``: drop the last n blocks.
- ``random``: n blocks drawn uniformly without replacement from ``seed``.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..checks import check_int


def _check_n(n: int, num_blocks: int) -> int:
    return check_int("n", n, 0, num_blocks - 1, expected=f"an int in [0, {num_blocks - 1}] blocks to remove")


def shortgpt(block_influence: Sequence[float], n: int) -> list[int]:
    """The n blocks with the lowest Block Influence (ties: lower index), sorted."""
    bi = np.asarray(block_influence, dtype=np.float64)
    _check_n(n, len(bi))
    order = sorted(range(len(bi)), key=lambda i: (bi[i], i))
    return sorted(order[:n])


def last_blocks(num_blocks: int, n: int) -> list[int]:
    _check_n(n, num_blocks)
    return list(range(num_blocks - n, num_blocks))


def random_blocks(num_blocks: int, n: int, seed: int = 0) -> list[int]:
    _check_n(n, num_blocks)
    return sorted(int(i) for i in np.random.default_rng(seed).choice(num_blocks, size=n, replace=False))


def angular_distances(hidden: np.ndarray, n: int) -> np.ndarray:
    """d[l] = mean over sequences of arccos(cos(h(l), h(l+n)))/pi, l = 0..L-n; ``hidden`` is [L+1, seqs, d]."""
    h = np.asarray(hidden, dtype=np.float64)
    if h.ndim != 3 or h.shape[0] < 2:
        raise ValueError(f"hidden: expected [num_blocks+1, n_seqs, d] last-token states, got shape {h.shape}")
    _check_n(n, h.shape[0] - 1)
    a, b = h[: h.shape[0] - n], h[n:]
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return (np.arccos(np.clip(cos, -1.0, 1.0)) / np.pi).mean(axis=1)


def angular_contiguous(hidden: np.ndarray, n: int) -> list[int]:
    """Gromov et al.: the run l*..l*+n-1 minimizing the angular distance between its input and output."""
    if n == 0:
        _check_n(n, np.asarray(hidden).shape[0] - 1)
        return []
    d = angular_distances(hidden, n)
    start = int(np.argmin(d))  # ties: the first (shallowest) run
    return list(range(start, start + n))


class LastTokenObserver:
    """``calibrate`` observer collecting each block's input and the last block's output at the last token.

    Memory: (L+1) x n_seqs x d floats. The last token of a sequence is its last position with mask 1.
    """

    def __init__(self) -> None:
        self._inputs: dict[tuple[int, int], torch.Tensor] = {}
        self._outputs: dict[tuple[int, int], torch.Tensor] = {}

    @staticmethod
    def _last(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(0)
        if mask is None:
            return x[:, -1, :]
        m = mask.to(x.device).reshape(x.shape[0], x.shape[1]).long()
        pos = (m * torch.arange(m.shape[1], device=x.device)).argmax(dim=1)
        return x[torch.arange(x.shape[0], device=x.device), pos]

    def observe(self, layer: int, block_input: torch.Tensor, block_output: torch.Tensor, batch_id: int,
                mask: torch.Tensor | None) -> None:
        self._inputs[(layer, batch_id)] = self._last(block_input, mask).detach().to("cpu", torch.float64).clone()
        self._outputs[(layer, batch_id)] = self._last(block_output, mask).detach().to("cpu", torch.float64).clone()

    def hidden_states(self) -> np.ndarray:
        """[L+1, n_seqs, d]: h(l) = input of block l for l < L, h(L) = output of the last block."""
        if not self._inputs:
            raise ValueError("LastTokenObserver: nothing observed; pass it to calibrate(observers=[...])")
        layers = sorted({l for l, _ in self._inputs})
        batches = sorted({b for _, b in self._inputs})
        if layers != list(range(len(layers))):
            raise ValueError(f"LastTokenObserver: saw blocks {layers}, expected 0..L-1 all")
        rows = [torch.cat([self._inputs[(l, b)] for b in batches]) for l in layers]
        rows.append(torch.cat([self._outputs[(layers[-1], b)] for b in batches]))
        return torch.stack(rows).numpy()


BASELINES = ("shortgpt", "angular", "last", "random")
