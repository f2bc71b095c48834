"""Stage 4, selection: which blocks go, inside the segments' frame.

``scores``: per-block scores from the calibration pass; ``frame``: the budget split and protection rules;
``registry``: every selector by name (rankings over a score, and the verified search); ``verifier``: the
calibration loss with blocks skipped, re-run from the kept block inputs; ``compensation``: least-squares maps
folded into the block before a removed run; ``verified``: the default search; ``baselines``: peers.
"""
