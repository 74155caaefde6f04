"""`FusedLinearPMDLoss`: fused_linear_pmd_loss as an nn.Module (like Liger's LigerFusedLinearGRPOLoss).

Plain-PyTorch equivalent of loss_fn(hidden, w, targets, mask, old, adv, bias):
    logp = log_softmax((hidden @ w.T + bias) / temperature).gather(-1, targets[..., None])[..., 0]
    pmd_loss(logp, old, adv, mask, tau=tau, length_norm=length_norm)
"""
from __future__ import annotations

import torch

from ._checks import check_positive
from .fused import fused_linear_pmd_loss
from .objectives import LossConfig


class FusedLinearPMDLoss(torch.nn.Module):
    """PMD loss straight from hidden states; no [tokens, vocab] logits. The options live in a `fastpmd.LossConfig`
    (`self.config`: tau, length_norm, chunk_size, backend; validated there), the sampling temperature beside it.

    forward(hidden [B, T, H], lm_head_weight [V, H], targets [B, T], mask [B, T], old_logprobs [B, T],
            advantages [B], bias [V] | None = None, num_sequences=None) -> (loss, metrics)
    """

    def __init__(self, tau: float = 0.01, length_norm: bool | float = True, temperature: float = 1.0,
                 chunk_size: int | None = None, backend: str = "auto"):
        super().__init__()
        self.config = LossConfig(name="pmd-mean", tau=tau, length_norm=length_norm, chunk_size=chunk_size,
                                 backend=backend)
        self.temperature = check_positive("temperature", temperature)

    def forward(self, hidden, lm_head_weight, targets, mask, old_logprobs, advantages, bias=None, num_sequences=None):
        c = self.config
        return fused_linear_pmd_loss(hidden, lm_head_weight, targets, mask, old_logprobs, advantages, tau=c.tau,
                                     length_norm=c.length_norm, temperature=self.temperature, bias=bias,
                                     chunk_size=c.chunk_size, num_sequences=num_sequences, backend=c.backend)

    def extra_repr(self) -> str:
        c = self.config
        return (f"tau={c.tau!r}, length_norm={c.length_norm!r}, temperature={self.temperature!r}, "
                f"chunk_size={c.chunk_size!r}, backend={c.backend!r}")
