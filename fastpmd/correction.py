"""Rollout correction: truncated importance sampling (TIS) weights for samples drawn by a rollout engine whose
probabilities differ from the trainer's (bf16 kernels, vLLM vs HF, MoE routing).

Plain-PyTorch equivalent (weights are constants: no gradient flows through them):
    token:    w[b, t] = min(exp(old[b, t] - rollout[b, t]), cap) where mask, else 0          # [B, T]
    sequence: w[b]    = min(exp(sum_t mask * (old - rollout)), cap)                         # [B]
pi_old is the trainer's policy at the start of the step, pi_rollout the engine's sampling distribution. Token
weights scale a token-level loss (GRPO/GSPO, `weights=` of grpo_loss/gspo_loss); sequence weights scale each
sequence's term of a sequence-level loss (PMD, `weights=` of pmd_loss/fused_linear_pmd_loss). The exponent is
clamped at log(cap) before exp, so a large log-ratio never overflows.
"""
from __future__ import annotations

import math

import torch

from ._checks import check_device, check_finite, check_positive, check_same_shape, check_tensor

__all__ = ["truncated_is_weights"]


@torch.no_grad()
def truncated_is_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, *,
                         cap: float = 2.0, level: str = "token") -> torch.Tensor:
    """TIS weights min(pi_old / pi_rollout, cap): per token [B, T] ("token") or per sequence [B] ("sequence").
    Under the finite-value switch, NaN/inf log-probs where the mask is True raise (a NaN weight otherwise)."""
    check_tensor("old_logprobs", old_logprobs, dims=2, floating=True)
    check_tensor("rollout_logprobs", rollout_logprobs, dims=2, floating=True)
    check_same_shape("rollout_logprobs", rollout_logprobs, "old_logprobs", old_logprobs.shape)
    check_tensor("mask", mask, dims=2)
    check_same_shape("mask", mask, "old_logprobs", old_logprobs.shape)
    check_device("rollout_logprobs", rollout_logprobs, "old_logprobs", old_logprobs.device)
    check_device("mask", mask, "old_logprobs", old_logprobs.device)
    if mask.is_floating_point():
        raise ValueError(f"mask must be bool or integer 0/1, got {mask.dtype}")
    if level not in ("token", "sequence"):
        raise ValueError(f"level must be 'token' or 'sequence', got {level!r}")
    log_cap = math.log(check_positive("cap", cap))
    mask = mask if mask.dtype == torch.bool else mask != 0
    check_finite("old_logprobs", old_logprobs, mask)
    check_finite("rollout_logprobs", rollout_logprobs, mask)
    diff = torch.where(mask, old_logprobs.float() - rollout_logprobs.float(), 0.0)  # [B, T]
    if level == "sequence":
        return diff.sum(-1).clamp(max=log_cap).exp()  # [B]
    return torch.where(mask, diff.clamp(max=log_cap).exp(), 0.0)  # [B, T]
