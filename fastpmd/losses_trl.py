"""TRL 1.16's other GRPOTrainer loss types as fastpmd losses: CISPO, SAPO and LUSPO.

Same contract as fastpmd.losses: (logprobs [B, T], old_logprobs [B, T], advantages [B], mask [B, T]) ->
(loss 0-d, metrics), masked positions selected away with torch.where, no host syncs. Each equals TRL's
`GRPOTrainer._compute_loss` with `loss_type` set to its name and beta = 0 (tests/core/test_trl_losses.py).
"""
from __future__ import annotations

import math

import torch

from ._checks import check_count, check_policy_inputs, check_positive
from .losses import _aggregate, _check_policy_weights, grpo_loss, masked_stats, sequence_logratio


def _log_ratio(logprobs, old, mask, level: str) -> torch.Tensor:
    """log(pi / pi_old) per token [B, T] ("token") or its mean over the response [B, 1] ("sequence")."""
    if level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {level!r}")
    log_ratio = torch.where(mask, logprobs - old, 0.0)
    if level == "sequence":
        return (log_ratio.sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1)
    return log_ratio


def _finish(loss, mask, old, logprobs, extra: dict) -> tuple[torch.Tensor, dict]:
    """(loss, metrics): the loss, token count, `extra` and the sequence log-ratio's mean / min / max."""
    metrics = {"loss": loss.detach(), "num_tokens": mask.sum().float(), **extra}
    metrics.update(masked_stats(sequence_logratio(logprobs, old, mask), mask.any(-1), "logratio"))
    return loss, metrics


def cispo_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor,  # [B, T], [B, T]
    advantages: torch.Tensor, mask: torch.Tensor,  # [B], [B, T]
    *,
    epsilon_high: float = 5.0,
    num_items: int | float | torch.Tensor | None = None,
    weights: torch.Tensor | None = None,  # [B, T] or [B, 1], constants (rollout correction)
    entropy_mask: torch.Tensor | None = None,  # [B, T] bool
):
    """CISPO (MiniMax-M1; ScaleRL's eps_max = 5): the importance ratio clipped from above and detached weighs a
    REINFORCE term. In plain PyTorch (TRL's loss_type="cispo"):
        r = exp(logprobs - old).clamp(max=epsilon_high).detach()
        loss = sum over mask of -r * A * logprobs (* weights) / num_items   (default num_items: mask.sum()).
    The ratio is formed from the log-ratio capped at log(epsilon_high) (the clamp makes the excess irrelevant),
    so no inf appears."""
    mask = check_policy_inputs(logprobs, old_logprobs, advantages, mask)
    check_positive("epsilon_high", epsilon_high)
    weights, entropy_mask = _check_policy_weights(weights, entropy_mask, logprobs, mask, None)
    old = old_logprobs.to(logprobs.dtype)
    log_ratio = _log_ratio(logprobs.detach(), old, mask, "token")
    ratio = torch.exp(log_ratio.clamp(max=math.log(epsilon_high)))  # == exp(log_ratio).clamp(max=epsilon_high)
    adv = advantages.to(logprobs.dtype).unsqueeze(1)
    per_token = -ratio * adv * logprobs
    if entropy_mask is not None:
        per_token = torch.where(entropy_mask, per_token, 0.0)
    if weights is not None:
        per_token = per_token * weights.to(per_token.dtype)
    loss = torch.where(mask, per_token, 0.0).sum() / check_count("num_items", num_items, mask.sum())
    clipped = (log_ratio > math.log(epsilon_high)) & (adv > 0)
    extra = {"cispo_clip_ratio": torch.where(mask, clipped, False).sum() / mask.sum().clamp(min=1)}
    return _finish(loss, mask, old, logprobs, extra)


def sapo_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor,  # [B, T], [B, T]
    advantages: torch.Tensor, mask: torch.Tensor,  # [B], [B, T]
    *,
    temperature_pos: float = 1.0,
    temperature_neg: float = 1.05,
    importance_sampling_level: str = "token",
    weights: torch.Tensor | None = None,  # [B, T] or [B, 1], constants (rollout correction)
    entropy_mask: torch.Tensor | None = None,  # [B, T] bool
):
    """SAPO (soft adaptive policy optimisation): a sigmoid gate instead of the hard clip. In plain PyTorch (TRL's
    loss_type="sapo", sapo_temperature_pos / _neg):
        r = exp(logprobs - old) (per token, or exp of the response mean with importance_sampling_level="sequence")
        t = temperature_pos where A > 0 else temperature_neg
        per_token = -sigmoid(t * (r - 1)) * 4 / t * A (* weights)
        loss = mean over sequences of (sum over mask of per_token / tokens of the sequence).
    The log-ratio is capped where sigmoid(t * (r - 1)) is 1 in the dtype (its gradient there underflows to 0
    anyway), so a huge ratio never forms inf * 0."""
    mask = check_policy_inputs(logprobs, old_logprobs, advantages, mask)
    check_positive("temperature_pos", temperature_pos)
    check_positive("temperature_neg", temperature_neg)
    weights, entropy_mask = _check_policy_weights(weights, entropy_mask, logprobs, mask, None)
    old = old_logprobs.to(logprobs.dtype)
    log_ratio = _log_ratio(logprobs, old, mask, importance_sampling_level)
    adv = advantages.to(logprobs.dtype).unsqueeze(1)
    t = torch.where(adv > 0, temperature_pos, temperature_neg).to(logprobs.dtype)  # [B, 1]
    cap = math.log(torch.finfo(logprobs.dtype).max) - 1.0 - math.log(max(temperature_pos, temperature_neg, 1.0))
    ratio = torch.exp(log_ratio.clamp(max=cap))
    soft = torch.sigmoid(t * (ratio - 1))  # [B, T] or [B, 1]
    per_token = (-soft * 4 / t * adv).expand_as(logprobs)
    if entropy_mask is not None:
        per_token = torch.where(entropy_mask, per_token, 0.0)
    if weights is not None:
        per_token = per_token * weights.to(per_token.dtype)
    loss = _aggregate(per_token, mask, "grpo", None, None)
    extra = {"sapo_gate_mean": torch.where(mask, soft.detach().expand_as(logprobs), 0.0).sum()
             / mask.sum().clamp(min=1)}
    return _finish(loss, mask, old, logprobs, extra)


def luspo_loss(logprobs, old_logprobs, advantages, mask, *, epsilon_low: float = 3e-4, epsilon_high: float = 4e-4,
               importance_sampling_level: str = "sequence", **kwargs):
    """LUSPO (length-unbiased sequence policy optimisation): GSPO's clipped sequence-ratio surrogate, each
    sequence's term summed over its tokens (not averaged), then the mean over sequences (TRL's loss_type="luspo").
    That aggregation is grpo_loss's dr_grpo with a constant divisor of 1: sum / B. Takes grpo_loss's options."""
    return grpo_loss(logprobs, old_logprobs, advantages, mask, loss_type="dr_grpo", max_completion_length=1,
                     epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                     importance_sampling_level=importance_sampling_level, **kwargs)
