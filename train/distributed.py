"""The process group: gloo on CPU, nccl on CUDA (plus gloo for host tensors under FSDP CPU offload), with a
timeout. The run is always a process group, world size 1 included, so one code path serves one and many
processes; torchrun's environment is read when present, else a plain process joins a world of one."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


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
    if dist.is_initialized():
        dist.destroy_process_group()
