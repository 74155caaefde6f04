"""Benchmarks of fastpmd (imported as fastpmd.bench)."""
if __name__ != "fastpmd.bench":  # `import bench` from the repository root: see fastpmd/_bare_name.py (stdlib only)
    import os
    import runpy

    runpy.run_path(os.path.join(os.path.dirname(__file__), os.pardir, "fastpmd", "_bare_name.py"))["step_aside"](
        __name__, __file__)
