"""FSDP2 set-up: activation checkpointing, then `fully_shard` per decoder block, then the root (the process group
is `distributed.py`'s).

Sharding layout (one FSDP unit per decoder block + the root):
- each decoder block: all-gathered just before its forward, resharded after it, gathered again for backward;
- the root `Policy` holds the embeddings, the final norm and the LM head. FSDP keeps the root unsharded from its
  forward through its backward, and the trainer keeps it so across an optimizer step's micro-batches
  (`Trainer.accumulate_gradients`), so the LM head weight is all-gathered once per optimizer step, stays gathered
  across every micro-batch and chunk of the fused loss, and its gradient is reduce-scattered once per step (fp32
  reduce by default).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .config import ModelConfig
from .model import decoder_blocks

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def apply_activation_checkpointing(hf: nn.Module) -> None:
    """Recompute every decoder block in backward (HF's non-reentrant checkpointing; parameter names unchanged)."""
    if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.x name
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def data_parallel_mesh(device: torch.device, replicate: int = 1):
    """FSDP's mesh: 1-D over every rank, or with `replicate` > 1 the 2-D HSDP mesh ("replicate", "shard") of
    replicate x world / replicate ranks (torchtitan's layout): parameters are sharded within a group of
    consecutive ranks (a node) and replicated across the groups; gradients are reduce-scattered within a group and
    all-reduced across groups."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if replicate < 1 or world % replicate:
        raise ValueError(f"config parallel.dp_replicate: {replicate} does not divide the world size {world}")
    if replicate == 1:
        return init_device_mesh(device.type, (world,))
    return init_device_mesh(device.type, (replicate, world // replicate), mesh_dim_names=("replicate", "shard"))


def apply_fsdp(policy: nn.Module, cfg: ModelConfig, device: torch.device, replicate: int = 1) -> nn.Module:
    """fully_shard each decoder block, then the root, over `data_parallel_mesh(device, replicate)` (HSDP when
    replicate > 1); params stay float32 masters, compute in cfg.param_dtype."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = data_parallel_mesh(device, replicate)
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
