"""Keep the repository's top-level folders from answering to their bare names.

kernels/, train/ and bench/ install as fastpmd.kernels, fastpmd.train and fastpmd.bench (pyproject's
package-dir), and that is the only way to import them. But `python -m ...`, `pytest` and `torchrun` put the
working directory first on sys.path, so from the repository root `import kernels` would find kernels/ and shadow
Hugging Face's `kernels` package, which transformers >= 5.25 imports with every model (`train` and `bench` are
PyPI names too). Each folder's __init__ therefore calls step_aside() when it runs under its bare name: the import
then resolves exactly as if the repository root were not on sys.path (the installed package of that name, or
ModuleNotFoundError). The folders run this file by path (runpy), so a bare-name import never imports fastpmd
itself (or torch): with nothing of that name installed, `import kernels` from the root fails with
ModuleNotFoundError in any interpreter. Limit: `importlib.util.find_spec("kernels")` from the root still names
kernels/__init__.py, because the folder is found before it steps aside.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def step_aside(name: str, init_file: str) -> None:
    """Replace the module being imported as `name` by the next `name` on sys.path outside this repository."""
    root = os.path.realpath(os.path.dirname(os.path.dirname(init_file)))
    path = [p for p in sys.path if os.path.realpath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # `import name` returns what sys.modules holds once the folder's __init__ is done
    spec.loader.exec_module(module)
