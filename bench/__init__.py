"""Benchmarks of fastpmd (imported as fastpmd.bench)."""
if __name__ != "fastpmd.bench":  # `import bench` from the repository root: see fastpmd/_bare_name.py
    from fastpmd._bare_name import step_aside

    step_aside(__name__, __file__)
