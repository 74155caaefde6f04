"""Trainer parameter names -> Hugging Face *checkpoint* names, for engines that load checkpoint-format weights.

transformers 5 keeps a Qwen3-MoE (and Qwen2-MoE) layer's experts fused in memory, two 3-D parameters per layer,
while the checkpoints on disk (and vLLM's loader, which reads them) name every expert's projections apart:

    model.layers.{l}.mlp.experts.gate_up_proj  [E, 2 I, H]  ->  ...mlp.experts.{e}.gate_proj.weight = [e, :I]   [I, H]
                                                                ...mlp.experts.{e}.up_proj.weight   = [e, I:]   [I, H]
    model.layers.{l}.mlp.experts.down_proj     [E, H, I]    ->  ...mlp.experts.{e}.down_proj.weight = [e]       [H, I]

(the fused module computes ``gate, up = (x @ gate_up_proj[e].T).chunk(2, -1)``, so gate is the first half; this
is also what ``save_pretrained`` writes). The per-expert tensors are views of the fused one: nothing is copied.
Every other name passes through unchanged.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

__all__ = ["FUSED_EXPERT_MODEL_TYPES", "checkpoint_tensors"]

# model types whose fused experts split into gate_proj / up_proj / down_proj per expert
FUSED_EXPERT_MODEL_TYPES = ("qwen3_moe", "qwen2_moe")
_GATE_UP, _DOWN = "mlp.experts.gate_up_proj", "mlp.experts.down_proj"


def checkpoint_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]],
                       model_type: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (checkpoint name, tensor) pairs; fused 3-D expert tensors become per-expert views.

    ``model_type`` (``config.model_type``) must be one of FUSED_EXPERT_MODEL_TYPES when a fused expert tensor
    appears (another family may name its experts differently, e.g. w1/w2/w3): a ValueError names it then.
    """
    for name, t in named_tensors:
        fused_gate_up, fused_down = name.endswith(_GATE_UP), name.endswith(_DOWN)
        if not (fused_gate_up or fused_down) or t.dim() != 3:
            yield name, t
            continue
        if model_type not in FUSED_EXPERT_MODEL_TYPES:
            raise ValueError(f"named_tensors: fused expert tensor {name!r} of model_type {model_type!r}: "
                             f"no per-expert checkpoint names known (only {FUSED_EXPERT_MODEL_TYPES})")
        prefix = name[: -len("gate_up_proj" if fused_gate_up else "down_proj")]  # '...mlp.experts.'
        if fused_gate_up:
            if t.shape[1] % 2:
                raise ValueError(f"named_tensors: {name!r} has an odd gate_up width {t.shape[1]}")
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                yield f"{prefix}{e}.gate_proj.weight", t[e, :inter]  # [I, H]
                yield f"{prefix}{e}.up_proj.weight", t[e, inter:]  # [I, H]
        else:
            for e in range(t.shape[0]):
                yield f"{prefix}{e}.down_proj.weight", t[e]  # [H, I]
