"""Test helper: record every torch.distributed collective and check that its tensors live on the process group's
device (gloo: cpu, nccl: cuda). NCCL rejects CPU tensors, so a trainer that builds a count on the host and
all-reduces it passes on gloo and fails on GPUs; this check makes the mistake visible on CPU-only runs too when
``expected_device_type`` names the device the trainer runs on (a CUDA run passes "cuda")."""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single")
BACKEND_DEVICE = {"gloo": "cpu", "nccl": "cuda"}


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)


@contextlib.contextmanager
def watch_collectives(expected_device_type: str | None = None):
    """Patch the collectives of torch.distributed; yields the list of (name, device type) calls seen. Any tensor
    on another device than ``expected_device_type`` (default: the default group's backend device) raises."""
    expected = expected_device_type or BACKEND_DEVICE[dist.get_backend()]
    calls: list[tuple[str, str]] = []
    saved = {}
    for name in COLLECTIVES:
        orig = getattr(c10d, name)

        @functools.wraps(orig)
        def wrapped(*args, _orig=orig, _name=name, **kwargs):
            for t in [*_tensors(args), *_tensors(list(kwargs.values()))]:
                if t.device.type != expected:
                    raise AssertionError(f"{_name}: a tensor on {t.device}, expected {expected} "
                                         f"(shape {tuple(t.shape)}, {t.dtype})")
                calls.append((_name, t.device.type))
            return _orig(*args, **kwargs)

        saved[name] = orig
        setattr(c10d, name, wrapped)
        setattr(dist, name, wrapped)
    try:
        yield calls
    finally:
        for name, orig in saved.items():
            setattr(c10d, name, orig)
            setattr(dist, name, orig)
