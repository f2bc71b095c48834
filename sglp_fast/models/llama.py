"""Llama family: ``model.layers`` of decoder layers + a rotary embedding on ``model`` (Llama, Mistral,
Qwen2/Qwen3, Gemma/Gemma2, Phi-3, SmolLM)."""
from __future__ import annotations

from .base import BlockAdapter


class LlamaFamilyAdapter(BlockAdapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "granite", "olmo", "olmo2")
    kind = "causal_lm"
    blocks_path = "model.layers"
    mlp_output = "mlp.down_proj"
    # post-sublayer norms (gemma2/3, olmo2) or a residual multiplier (granite) break out = h_mid + mlp_out
    _not_additive = ("gemma2", "gemma3", "olmo2", "granite")

    def mlp_output_path(self):
        return None if getattr(self.config, "model_type", None) in self._not_additive else self.mlp_output

    def _fix_family_config(self, cfg, kept, old_n):
        # Qwen2/Qwen3: layers with index >= max_window_layers use sliding windows; keep the same layers so.
        mwl = getattr(cfg, "max_window_layers", None)
        if isinstance(mwl, int):
            cfg.max_window_layers = sum(1 for old in kept if old < mwl)
