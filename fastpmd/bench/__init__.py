"""Benchmarks of fastpmd (their modules: the repository's bench/ folder)."""
from .._layout import source_folder

__path__ += source_folder(__file__)  # noqa: F821 - a package's own __path__
