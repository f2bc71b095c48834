"""GPT-2: ``transformer.h`` blocks, learned positions, ``ln_f`` + tied ``lm_head``."""
from __future__ import annotations

import warnings

from .base import BlockAdapter


class GPT2Adapter(BlockAdapter):
    family = "gpt2"
    model_types = ("gpt2",)
    kind = "causal_lm"
    blocks_path = "transformer.h"
    mlp_output = "mlp.c_proj"

    def _fix_family_config(self, cfg, kept, old_n):
        # n_layer is the GPT-2 name of num_hidden_layers (attribute_map); set it explicitly all the same.
        cfg.n_layer = len(kept)
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) and kept != list(range(len(kept))):
            warnings.warn(
                "GPT-2 with scale_attn_by_inverse_layer_idx=True scales attention by 1/(layer_idx+1): "
                "after re-indexing, a reloaded model scales moved blocks differently than the calibrated one",
                stacklevel=3,
            )
