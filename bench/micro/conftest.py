"""pytest configuration for the op-level microbenchmarks: `pytest bench/micro --benchmark-only`.

The default `pytest` run never sees this directory (pyproject: testpaths = ["tests"]). Here, files named
bench_*.py are collected as test modules, next to the default test_*.py pattern. bench/micro/ has no __init__.py
and its own pytest.ini (its own rootdir), so pytest imports these files by their own names, never as part of a
package named `bench` (see fastpmd/_layout.py).
"""
import pytest


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
