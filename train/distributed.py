"""The process group: gloo on CPU, nccl on CUDA (plus gloo for host tensors under FSDP CPU offload), with a
timeout. The run is always a process group, world size 1 included, so one code path serves one and many
processes; torchrun's environment is read when present, else a plain process joins a world of one."""
from __future__ import annotations

import gc
import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.nn.functional  # noqa: F401  before any init: see shutdown_distributed


@dataclass
class Dist:
    """Where this process sits: rank, world size, device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("run.device: 'cuda' requested but CUDA is not available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_for(device: torch.device, cpu_offload: bool = False) -> str:
    """gloo on CPU, nccl on CUDA (plus gloo for host tensors under FSDP CPU offload)."""
    return ("cuda:nccl,cpu:gloo" if cpu_offload else "nccl") if device.type == "cuda" else "gloo"


def init_distributed(requested_device: str = "auto", timeout_min: float = 30.0, cpu_offload: bool = False) -> Dist:
    """Join (or create, for a plain single process) the default process group; backend chosen by device.
    A collective that waits longer than `timeout_min` minutes fails instead of hanging (run.timeout_min).
    cpu_offload on CUDA adds gloo for host tensors (FSDP's offloaded gradient norms), nccl for the rest."""
    device = pick_device(requested_device)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = backend_for(device, cpu_offload)
        timeout = timedelta(minutes=timeout_min)
        if "RANK" in os.environ:  # launched by torchrun
            dist.init_process_group(backend=backend, timeout=timeout)
        else:  # plain `python -m fastpmd.train`: a world of one (the environment is left untouched)
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                                    world_size=1, timeout=timeout)
    return Dist(dist.get_rank(), dist.get_world_size(), device)


def shutdown_distributed() -> None:
    """Destroy every process group so that its backend (gloo's worker and transport threads) ends here, not in
    interpreter finalization, where tearing a gloo group down can abort the process ("terminate called without
    an active exception": rare, but 2 of the last 3 clean-clone CI runs lost a 2-rank test to it).

    `destroy_process_group` only drops the registry's references; three holders outside our code keep the
    default group alive past it: `torch.distributed.nn.functional`'s default arguments (`group=group.WORLD`,
    bound when that module is first imported: so it is imported above, before any group exists), and DTensor's
    caches (sharding propagation, in Python and C++, and redistribute plans), whose specs hold the DeviceMesh
    that holds its groups in `_pg_registry`. The sharding caches are cleared (the C++ one would otherwise drop
    Python objects after finalization) and every live mesh lets go of its groups, whichever cache keeps it.
    `tests/train/test_distributed_exit.py` checks that no gloo thread survives a run."""
    if not dist.is_initialized():
        return
    if "torch.distributed.tensor" in sys.modules:
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import debug

        clear = getattr(debug, "_clear_sharding_prop_cache", None)  # Python and C++ fast-path caches (private)
        if clear is not None:
            clear()
        gc.collect()
        for obj in gc.get_objects():
            registry = getattr(obj, "_pg_registry", None) if type(obj) is DeviceMesh else None  # no __instancecheck__
            if isinstance(registry, dict):
                registry.clear()
    dist.destroy_process_group()
