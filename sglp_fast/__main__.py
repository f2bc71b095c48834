"""``python -m sglp_fast ...``, and ``torchrun --nproc-per-node N -m sglp_fast prune ...``: the ``sglp`` CLI."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
