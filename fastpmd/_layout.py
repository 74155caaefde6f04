"""Where fastpmd.kernels, fastpmd.train and fastpmd.bench keep their modules.

Each of the three is a regular package whose `__init__.py` sits in fastpmd/<name>/; its modules live in the
repository's top-level <name>/ folder (the promised layout), which has no `__init__.py`. From the repository root
(`python -m ...`, pytest and torchrun put it first on sys.path) such a folder is at most a namespace portion, and
any installed package of that name wins over it: `import kernels` is Hugging Face's package, which transformers
imports with every model. In a source checkout or an editable install each package's `__path__` gains its folder;
a wheel holds the modules beside the `__init__.py` (pyproject: package-dir and package-data).
"""
from __future__ import annotations

import os


def source_folder(init_file: str) -> list[str]:
    """[<checkout>/<name>] for fastpmd/<name>/__init__.py in a source checkout, else [] (an installed wheel)."""
    here = os.path.dirname(os.path.realpath(init_file))  # through links to the checkout (bench/gpu_env.sh)
    root, name = os.path.dirname(os.path.dirname(here)), os.path.basename(here)
    folder = os.path.join(root, name)
    return [folder] if os.path.isfile(os.path.join(root, "pyproject.toml")) and os.path.isdir(folder) else []
