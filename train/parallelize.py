"""Process group and FSDP2 set-up: gloo on CPU, nccl on CUDA; activation checkpointing, then `fully_shard` per
decoder block, then the root.

Sharding layout (one FSDP unit per decoder block + the root):
- each decoder block: all-gathered just before its forward, resharded after it, gathered again for backward;
- the root `Policy` holds the embeddings, the final norm and the LM head. FSDP keeps the root unsharded from its
  forward through its backward, and the trainer keeps it so across an optimizer step's micro-batches
  (`Trainer.accumulate_gradients`), so the LM head weight is all-gathered once per optimizer step, stays gathered
  across every micro-batch and chunk of the fused loss, and its gradient is reduce-scattered once per step (fp32
  reduce by default).
The run is always a process group, world size 1 included, so one code path serves one and many processes.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from .config import ModelConfig
from .model import decoder_blocks

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


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


def init_distributed(requested_device: str = "auto", timeout_min: float = 30.0, cpu_offload: bool = False) -> Dist:
    """Join (or create, for a plain single process) the default process group; backend chosen by device.
    A collective that waits longer than `timeout_min` minutes fails instead of hanging (run.timeout_min).
    cpu_offload on CUDA adds gloo for host tensors (FSDP's offloaded gradient norms), nccl for the rest."""
    device = pick_device(requested_device)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = ("cuda:nccl,cpu:gloo" if cpu_offload else "nccl") if device.type == "cuda" else "gloo"
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


def apply_activation_checkpointing(hf: nn.Module) -> None:
    """Recompute every decoder block in backward (HF's non-reentrant checkpointing; parameter names unchanged)."""
    if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.x name
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def apply_fsdp(policy: nn.Module, cfg: ModelConfig, device: torch.device) -> nn.Module:
    """fully_shard each decoder block, then the root; params stay float32 masters, compute in cfg.param_dtype."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    param_dtype = DTYPES[cfg.param_dtype]
    mp = MixedPrecisionPolicy(param_dtype=None if param_dtype == torch.float32 else param_dtype,
                              reduce_dtype=DTYPES[cfg.reduce_dtype])
    # cpu_offload: sharded params, grads and the optimizer step live in host memory; FSDP copies each unit's
    # shard to the device for its all-gather (on a CPU run the shards are already there: nothing moves)
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cfg.cpu_offload else OffloadPolicy()
    blocks = decoder_blocks(policy.hf)
    for i, block in enumerate(blocks):
        # the last block is gathered again right away for backward: keep it unsharded
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1, offload_policy=offload)
    fully_shard(policy, mesh=mesh, mp_policy=mp, offload_policy=offload)
    return policy
