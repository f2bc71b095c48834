"""Stage 3, segments: Fisher optimal segmentation of the ordered blocks (C++ core ``sglp_fast._fisher``,
wrapped and validated in ``fisher``; ``reference`` is the numpy spec it is tested against)."""
from .fisher import Segmentation, fisher_segment, fisher_segment_costs

__all__ = ["Segmentation", "fisher_segment", "fisher_segment_costs"]
