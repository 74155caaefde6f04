"""The fastpmd trainer (its modules: the repository's train/ folder): `fastpmd train ...` or `python -m fastpmd.train
...`."""
from .._layout import source_folder

__path__ += source_folder(__file__)  # noqa: F821 - a package's own __path__

from .cli import main  # noqa: E402

__all__ = ["main"]
