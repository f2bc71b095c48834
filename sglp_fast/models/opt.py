"""OPT: ``model.decoder.layers``, learned positions, optional final norm and projections."""
from __future__ import annotations

from .base import BlockAdapter


class OPTAdapter(BlockAdapter):
    family = "opt"
    model_types = ("opt",)
    kind = "causal_lm"
    blocks_path = "model.decoder.layers"
    mlp_output = "fc2"

    def mlp_output_path(self):
        # post-LN OPT (do_layer_norm_before=False, e.g. opt-350m) normalizes after the residual add
        return self.mlp_output if getattr(self.config, "do_layer_norm_before", True) else None
