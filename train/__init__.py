"""The fastpmd trainer (imported as fastpmd.train): `fastpmd train ...` or `python -m fastpmd.train ...`."""
from .cli import main

__all__ = ["main"]
