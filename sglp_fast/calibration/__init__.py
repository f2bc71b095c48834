"""Stage 1, calibration: run the calibration text through the model one block at a time under a memory budget.

``text`` turns a source into token windows; ``runtime.calibrate`` embeds them, runs every block over every
batch (weights from ``weights``/``lazy_weights``, activations in the tiered ``store``, sized by ``memory``),
hands each block's (input, output) to observers, computes the loss (``losses``) and, when asked, the top-down
backward for GradNorm; ``kept_inputs`` is the handle to the dense block inputs a later stage may re-run
blocks from. It knows nothing of how blocks are selected.
"""
from .runtime import CalibrationResult, NonFiniteActivationError, calibrate
from .text import CalibrationData, load_calibration

__all__ = ["CalibrationData", "CalibrationResult", "NonFiniteActivationError", "calibrate", "load_calibration"]
