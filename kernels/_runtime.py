"""Runtime glue for the Triton kernels: interpreter detection, per-mode kernel objects, device queries.

Triton decides at decoration time whether `@triton.jit` builds a compiled `JITFunction` or an
`InterpretedFunction` (it reads TRITON_INTERPRET through `triton.knobs.runtime.interpret`). fastpmd.kernels may be
imported before a test sets TRITON_INTERPRET=1, so the kernels here are wrapped by `kernel(...)`, which keeps the
plain Python function and builds the compiled or the interpreted variant on first launch in the mode that is
active *at launch time*. Kernels therefore never call other jit functions (a compiled helper cannot run under the
interpreter); each kernel is self-contained.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

try:  # triton is optional at import time: is_available() says False without it
    import triton
    import triton.language as tl  # noqa: F401  (re-exported for kernel modules)
    from triton.runtime.jit import JITFunction
    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    JITFunction = None
    HAS_TRITON = False


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 at launch time)."""
    if not HAS_TRITON:
        return False
    return bool(triton.knobs.runtime.interpret)


class Kernel:
    """A Triton kernel defined once, launched compiled on CUDA or interpreted on CPU: `k[grid](*args, **meta)`."""

    def __init__(self, fn, do_not_specialize=()):
        self.fn = fn
        self.__name__ = fn.__name__
        self.do_not_specialize = tuple(do_not_specialize)
        self._compiled = None
        self._interpreted = None

    def jit_function(self):
        """The compiled-mode `JITFunction` (also used by the kernels report to compile for a GPU target)."""
        if self._compiled is None:
            self._compiled = JITFunction(self.fn, do_not_specialize=self.do_not_specialize)
        return self._compiled

    def _variant(self):
        if interpreting():
            if self._interpreted is None:
                from triton.runtime.interpreter import InterpretedFunction
                self._interpreted = InterpretedFunction(self.fn)
            return self._interpreted
        return self.jit_function()

    def __getitem__(self, grid):
        return self._variant()[grid]


def kernel(do_not_specialize=()):
    """Decorator: `@kernel(do_not_specialize=["n_tokens"])` in place of `@triton.jit`."""
    return functools.partial(Kernel, do_not_specialize=do_not_specialize)


@functools.lru_cache(maxsize=None)
def _cuda_props(index: int):
    props = torch.cuda.get_device_properties(index)
    return props.major * 10 + props.minor, props.multi_processor_count


def family_of_capability(cc: int) -> str:
    """Config family (kernels/configs.py) of compute capability cc = 10 * major + minor."""
    if cc >= 120:
        return "120"    # consumer/workstation Blackwell: mma.sync, ~99 KiB shared memory per block
    if cc >= 100:
        return "100"    # datacenter Blackwell (10.x; 11.x shares tcgen05): tcgen05.mma, 227 KiB
    if cc >= 90:
        return "90"     # Hopper: wgmma
    return "80"         # Ampere/Ada: mma.sync


def arch_of(device: torch.device) -> str:
    """Config family for a device: "interp" (CPU interpreter) or family_of_capability of the CUDA device."""
    if device.type != "cuda":
        return "interp"
    cc, _ = _cuda_props(device.index if device.index is not None else torch.cuda.current_device())
    return family_of_capability(cc)


def on_device(device: torch.device):
    """Context for launching on `device`: Triton launches on the *current* CUDA device, so tensors on cuda:1
    need torch.cuda.device(1) while cuda:0 is current. A no-op context on CPU (interpreter)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


# Offsets inside the kernels are 32-bit except the scalar tile bases (int64): every operand's largest element
# offset (its span from the strides) must stay below this. A module constant so that tests can lower it.
INDEX_LIMIT = 2**31


def max_offset(t: torch.Tensor) -> int:
    """Largest element offset addressed by `t` (from its shape and strides), 0 for an empty tensor."""
    if t.numel() == 0:
        return 0
    return sum((size - 1) * abs(st) for size, st in zip(t.shape, t.stride()))


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (2 under the interpreter, enough to exercise the vocab split)."""
    if device.type != "cuda":
        return 2
    return _cuda_props(device.index if device.index is not None else torch.cuda.current_device())[1]


def check_runnable(device: torch.device, what: str) -> None:
    """Raise a clear error unless `device` can run Triton kernels (CUDA + triton, or the interpreter on CPU)."""
    if not HAS_TRITON:
        raise RuntimeError(f"{what}: backend='triton' needs the `triton` package (pip install 'fastpmd[triton]').")
    if device.type == "cuda":
        return
    if device.type == "cpu" and interpreting():
        return
    raise RuntimeError(
        f"{what}: backend='triton' needs CUDA tensors (got device {device}); on CPU it runs only under the Triton "
        "interpreter (set TRITON_INTERPRET=1 before launching). Use backend='torch' on CPU.")


def is_available(device) -> bool:
    """True when Triton kernels can run on `device`: CUDA present and triton importable, or TRITON_INTERPRET=1."""
    device = torch.device(device)
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and (interpreting() or os.environ.get("TRITON_INTERPRET", "0") == "1")
