"""Step 5 of the RL step: the policy's full weights into the rollout engine, one FSDP unit at a time.

Each decoder block's unit, then the root (embeddings, final norm, LM head), is all-gathered once (`unshard`, in
FSDP's compute dtype: `model.param_dtype`, bf16 in the presets), its tensors are handed to the engine as copies
(so the engine may keep them), and the unit is resharded before the next one is gathered: the largest transient
is one gathered unit and its copy. Plain-PyTorch equivalent: `{name: p.full_tensor().to(param_dtype)}` for every
parameter (one gather per parameter, in fp32, before).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from .model import decoder_blocks, hf_state_key


def unit_tensors(policy: nn.Module, hf: nn.Module, stats: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF state-dict name, gathered tensor copy) of every parameter, unit by unit; counts "gathers" and
    "bytes" into `stats`."""
    blocks = decoder_blocks(hf)
    units = [(b, f"hf.model.layers.{i}") for i, b in enumerate(blocks)] + [(policy, "")]
    for unit, prefix in units:
        unit.unshard()  # cpu_offload: FSDP copies the shard to the device first
        stats["gathers"] += 1
        for name, p in unit.named_parameters(prefix=prefix):
            if unit is policy and name.startswith("hf.model.layers."):
                continue  # the blocks' own units
            stats["bytes"] += p.numel() * p.element_size()
            yield hf_state_key(name), p.detach().clone()
        unit.reshard()


@torch.no_grad()
def sync_weights(policy: nn.Module, hf: nn.Module, engine) -> dict:
    """Stream every weight into `engine.update_weights`; returns {"gathers", "bytes"} sent by this rank."""
    stats = {"gathers": 0, "bytes": 0}
    engine.update_weights(unit_tensors(policy, hf, stats))
    return stats
