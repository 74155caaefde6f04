"""Helpers for running fastpmd.kernels under the Triton CPU interpreter inside pytest.

Triton builds its own standard-library functions (tl.sum, tl.max, tl.cdiv, ...) as compiled or interpreted
functions when `triton` is first imported, reading TRITON_INTERPRET at that moment (triton 3.9: knobs.runtime.
interpret, consulted by @triton.jit at decoration time). fastpmd.kernels itself picks the mode per launch, so:
- if triton is not imported yet, `prepare()` imports it with TRITON_INTERPRET=1 and restores the variable
  (tests then set TRITON_INTERPRET=1 per test with monkeypatch, so other test modules see the environment they
  expect);
- if an earlier module already imported triton in compiled mode, in-process interpretation is impossible and
  the kernel test module is re-run in a fresh Python process (`run_module_in_subprocess`).
On a CUDA machine nothing is changed: the kernels run compiled.
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch

ON_GPU = torch.cuda.is_available()


def _stdlib_interpreted() -> bool:
    import triton.language as tl
    from triton.runtime.jit import JITFunction
    return not isinstance(tl.standard.sum, JITFunction)


def prepare() -> bool:
    """True when the kernels can run in this process (GPU, or interpreter-ready triton)."""
    if ON_GPU:
        return True
    if "triton" in sys.modules:
        return _stdlib_interpreted()
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401  (builds the standard library as interpreted functions)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    return _stdlib_interpreted()


def run_module_in_subprocess(path: str, timeout: int = 600) -> None:
    """Run the test module `path` in a fresh interpreter with TRITON_INTERPRET=1; fail with its output."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{path} under the interpreter failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
