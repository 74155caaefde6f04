"""`FusedLinearPMDLoss`: fused_linear_pmd_loss as an nn.Module (like Liger's LigerFusedLinearGRPOLoss).

Plain-PyTorch equivalent of loss_fn(hidden, w, targets, mask, old, adv, bias):
    logp = log_softmax((hidden @ w.T + bias) / temperature).gather(-1, targets[..., None])[..., 0]
    pmd_loss(logp, old, adv, mask, tau=tau, length_norm=length_norm)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import check_backend, check_positive
from .fused import fused_linear_pmd_loss
from .losses import length_divisor


@dataclass(frozen=True)
class PMDLossOptions:
    """tau: PMD temperature; length_norm: token count (True), 1 (False) or a number; temperature: the logits'
    divisor; chunk_size: tokens per chunk (None: default); backend: auto | naive | torch | triton."""

    tau: float = 0.01
    length_norm: bool | float = True
    temperature: float = 1.0
    chunk_size: int | None = None
    backend: str = "auto"

    def __post_init__(self):
        check_positive("tau", self.tau)
        check_positive("temperature", self.temperature)
        length_divisor(self.length_norm, torch.ones(1))  # validates a numeric length_norm
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {self.chunk_size!r}")
        check_backend(self.backend)


class FusedLinearPMDLoss(torch.nn.Module):
    """PMD loss straight from hidden states; no [tokens, vocab] logits. Options as in PMDLossOptions.

    forward(hidden [B, T, H], lm_head_weight [V, H], targets [B, T], mask [B, T], old_logprobs [B, T],
            advantages [B], bias [V] | None = None, num_sequences=None) -> (loss, metrics)
    """

    def __init__(self, tau: float = 0.01, length_norm: bool | float = True, temperature: float = 1.0,
                 chunk_size: int | None = None, backend: str = "auto"):
        super().__init__()
        self.options = PMDLossOptions(tau, length_norm, temperature, chunk_size, backend)

    def forward(self, hidden, lm_head_weight, targets, mask, old_logprobs, advantages, bias=None, num_sequences=None):
        o = self.options
        return fused_linear_pmd_loss(hidden, lm_head_weight, targets, mask, old_logprobs, advantages, tau=o.tau,
                                     length_norm=o.length_norm, temperature=o.temperature, bias=bias,
                                     chunk_size=o.chunk_size, num_sequences=num_sequences, backend=o.backend)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in vars(self.options).items())
