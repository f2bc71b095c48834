"""Stage 6, the pruned model: apply a plan in memory (``apply``), save it atomically (``save``), or prune a
safetensors checkpoint on disk without loading it (``checkpoint``)."""
from .apply import apply_plan, remove_blocks
from .checkpoint import prune_checkpoint
from .save import check_output_dir, save_pruned

__all__ = ["apply_plan", "check_output_dir", "prune_checkpoint", "remove_blocks", "save_pruned"]
