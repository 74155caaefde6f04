"""Helpers for running fastpmd.kernels under the Triton CPU interpreter inside pytest.

The kernels are plain `@triton.jit` functions, built compiled or interpreted when fastpmd.kernels is imported
(TRITON_INTERPRET read through triton.knobs.runtime.interpret); triton's own standard library (tl.sum, tl.max,
...) is built when `triton` is first imported. So a kernel test module calls `prepare()` before importing
fastpmd.kernels:
- if neither is imported yet (or triton is, in interpreter mode), it imports fastpmd.kernels with
  TRITON_INTERPRET=1 and restores the variable (tests then set TRITON_INTERPRET=1 per test with monkeypatch,
  which kernels/_runtime.is_available also reads, so other test modules see the environment they expect);
- if triton or fastpmd.kernels was already imported in compiled mode, in-process interpretation is impossible
  and the test module is re-run in a fresh Python process with TRITON_INTERPRET=1 (`run_module_in_subprocess`).
On a CUDA machine nothing is changed: the kernels run compiled.
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch

ON_GPU = torch.cuda.is_available()


def _interpreted() -> bool:
    import triton.language as tl
    from triton.runtime.jit import JITFunction
    if isinstance(tl.standard.sum, JITFunction):
        return False                       # triton's standard library was built compiled
    if "fastpmd.kernels" not in sys.modules:
        return True
    from fastpmd.kernels import _runtime
    return _runtime.INTERPRETED


def prepare() -> bool:
    """True when the kernels can run in this process (GPU, or kernels built for the interpreter)."""
    if ON_GPU:
        return True
    if "triton" in sys.modules and not _interpreted():
        return False
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import fastpmd.kernels  # noqa: F401  (decorates every kernel as an InterpretedFunction)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    return _interpreted()


def run_module_in_subprocess(path: str, timeout: int = 900) -> None:
    """Run the test module `path` in a fresh interpreter with TRITON_INTERPRET=1; fail with its output."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{path} under the interpreter failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    assert "imported in compiled mode" not in proc.stdout and " passed" in proc.stdout, (
        f"{path}: the fresh interpreter process ran no kernel test:\n{proc.stdout[-3000:]}")
