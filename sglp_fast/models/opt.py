"""OPT: ``model.decoder.layers``, learned positions, optional final norm and projections."""
from __future__ import annotations

from .base import BlockAdapter


class OPTAdapter(BlockAdapter):
    family = "opt"
    model_types = ("opt",)
    kind = "causal_lm"
    blocks_path = "model.decoder.layers"
