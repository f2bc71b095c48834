"""Stage 2, similarity: the L×L CKA matrix between block outputs, streamed (Triton kernels in ``kernels/``,
installed as ``sglp_fast.kernels``; the same math in torch on the CPU), and its heatmap."""
from .accumulator import CKAAccumulator, cka_matrix

__all__ = ["CKAAccumulator", "cka_matrix"]
