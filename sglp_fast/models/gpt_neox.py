"""GPT-NeoX / Pythia: ``gpt_neox.layers``, rotary embedding on ``gpt_neox``, ``embed_out`` head."""
from __future__ import annotations

from .base import BlockAdapter


class GPTNeoXAdapter(BlockAdapter):
    family = "gpt_neox"
    model_types = ("gpt_neox",)
    kind = "causal_lm"
    blocks_path = "gpt_neox.layers"
    mlp_output = "mlp.dense_4h_to_h"
