"""The fastpmd trainer (imported as fastpmd.train): `fastpmd train ...` or `python -m fastpmd.train ...`."""
if __name__ != "fastpmd.train":  # `import train` from the repository root: see fastpmd/_bare_name.py (stdlib only)
    import os
    import runpy

    runpy.run_path(os.path.join(os.path.dirname(__file__), os.pardir, "fastpmd", "_bare_name.py"))["step_aside"](
        __name__, __file__)
else:
    from .cli import main

    __all__ = ["main"]
