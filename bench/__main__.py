"""`python -m fastpmd.bench ...`: the same as `fastpmd bench ...`."""
import sys

from .cli import main

sys.exit(main())
