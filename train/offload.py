"""Host offload around the rollout phase: the trainer's sharded parameters and optimizer state move to host
memory while the rollout engine generates, and back before the update (`model.offload_during_rollout`). The
trainer moves the optimizer state first, sends the weights to the engine, then moves the model.

FSDP2 modules support `module.to(device)` on sharded parameters (its `_apply` reshards first and re-registers
the shards); optimizer state tensors are moved one by one and each goes back to the device it came from (AdamW
keeps its `step` counters on the host). Gradients are None between optimizer steps, so there is nothing else.
"""
from __future__ import annotations

import torch
from torch import nn


def optimizer_to_host(optimizer: torch.optim.Optimizer) -> list:
    """Move the optimizer state to the host (the model stays); returns what `reload` needs."""
    moved = []
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.device.type != "cpu":
                moved.append((state, key, value.device))
                state[key] = value.to("cpu", non_blocking=True)
    return moved


def reload(model: nn.Module, device: torch.device, moved: list) -> None:
    """Undo `optimizer_to_host` and `model.to("cpu")`: model on `device`, each moved optimizer tensor on its own
    device again."""
    model.to(device)
    for state, key, dev in moved:
        state[key] = state[key].to(dev, non_blocking=True)
