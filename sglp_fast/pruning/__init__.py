"""Stage 6, the pruned model: apply a plan in memory (``apply``), save it atomically (``save``: safetensors,
or a GGUF that keeps the source's quantization, ``gguf``), prune a safetensors checkpoint on disk without
loading it (``checkpoint``), or hand the plan to other tools (``exports``: mergekit, llama.cpp)."""
from .apply import apply_plan, remove_blocks
from .checkpoint import prune_checkpoint
from .exports import export_mergekit, llama_cpp_command
from .gguf import write_pruned_gguf
from .save import check_output_dir, save_pruned, save_pruned_gguf

__all__ = ["apply_plan", "check_output_dir", "export_mergekit", "llama_cpp_command", "prune_checkpoint",
           "remove_blocks", "save_pruned", "save_pruned_gguf", "write_pruned_gguf"]
