"""BERT-style encoders: ``[bert.]encoder.layer``; bidirectional mask; MLM head optional."""
from __future__ import annotations

from torch import nn

from .base import BlockAdapter, resolve_path


class BertAdapter(BlockAdapter):
    family = "bert"
    model_types = ("bert", "roberta", "xlm-roberta", "electra")
    kind = "encoder"
    blocks_path = "encoder.layer"

    def __init__(self, model: nn.Module, blocks_path: str | None = None):
        if blocks_path is None:
            prefix = getattr(model, "base_model_prefix", "")
            # BertModel holds .encoder itself; task models (BertForMaskedLM, ...) hold it under .bert
            if not hasattr(model, "encoder") and prefix and hasattr(model, prefix):
                blocks_path = f"{prefix}.encoder.layer"
            else:
                blocks_path = "encoder.layer"
            resolve_path(model, blocks_path)  # AttributeError here means not a BERT-like layout
        super().__init__(model, blocks_path)
