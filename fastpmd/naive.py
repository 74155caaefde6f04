"""The naive LM-head log-prob: materialise all logits. The test oracle (in float64) and the benchmark baseline.

Plain PyTorch, autograd does the backward:
    z = ((hidden @ weight.T + bias).float()) / temperature          # [n, V]  <- the tensor fastpmd never builds
    logp = log_softmax(z).gather(targets);  entropy = -(softmax(z) * log_softmax(z)).sum(-1)
(the entropy with log p floored at -1e4, so that columns masked by a -inf bias add 0 rather than NaN)
"""
from __future__ import annotations

import torch

from .chunked import LOGP_FLOOR


def naive_linear_logprobs(
    hidden: torch.Tensor,  # [n, H]
    weight: torch.Tensor,  # [V, H]
    targets: torch.Tensor,  # [n] int
    bias: torch.Tensor | None,  # [V] or None
    temperature: float,
    return_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    compute_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    z = z.to(compute_dtype) / temperature  # [n, V]
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, targets[:, None].long())[:, 0]
    entropy = None
    if return_entropy:  # log p floored: a -inf (masked) column has p = 0 and must add 0, not 0 * -inf = NaN
        entropy = -(logp_all.exp() * logp_all.clamp(min=LOGP_FLOOR)).sum(-1)
    return logp, entropy
