"""Runtime glue for the Triton kernels: interpreter detection, device queries, offset limits, availability.

The kernels are plain `@triton.jit` functions: Triton decides at decoration time (when fastpmd.kernels is
imported) whether they are compiled `JITFunction`s or CPU-interpreted `InterpretedFunction`s, reading
TRITON_INTERPRET through `triton.knobs.runtime.interpret`. So the interpreter needs TRITON_INTERPRET=1 *before*
fastpmd.kernels is imported (tests/triton_interp.py runs the kernel test modules in such a process), and
`interpreting()` reports the mode the kernels were built in, not the variable's current value.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

try:  # triton is optional at import time: is_available() says False without it
    import triton
    import triton.language as tl  # noqa: F401  (re-exported for kernel modules)
    HAS_TRITON = True
    INTERPRETED = bool(triton.knobs.runtime.interpret)   # the mode every fastpmd kernel is decorated in
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    HAS_TRITON = False
    INTERPRETED = False


def interpreting() -> bool:
    """True when the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return INTERPRETED


def _cpu_interpreter_on() -> bool:
    """CPU launches: kernels built for the interpreter and TRITON_INTERPRET=1 still set (a caller that unsets
    it asks for the CPU path to be unavailable)."""
    return INTERPRETED and os.environ.get("TRITON_INTERPRET", "0") == "1"


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
    if device.type == "cpu" and _cpu_interpreter_on():
        return
    raise RuntimeError(
        f"{what}: backend='triton' needs CUDA tensors (got device {device}); on CPU it runs only under the Triton "
        "interpreter (set TRITON_INTERPRET=1 before importing fastpmd). Use backend='torch' on CPU.")


def is_available(device) -> bool:
    """True when Triton kernels can run on `device`: CUDA present and triton importable, or (CPU) the kernels
    were built for the interpreter (TRITON_INTERPRET=1 when fastpmd.kernels was imported)."""
    device = torch.device(device)
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and _cpu_interpreter_on()
