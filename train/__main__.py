"""`python -m fastpmd.train ...` and `torchrun --nproc_per_node N -m fastpmd.train ...` (see fastpmd.train.cli)."""
import sys

from fastpmd.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
