"""Policy losses on per-token log-probs: PMD (mean / partition targets), GRPO, GSPO and on-policy PG.

Every loss takes (logprobs [B, T], old_logprobs [B, T], advantages [B], mask [B, T]) and returns
(loss 0-d, metrics: dict of detached 0-d tensors). No host syncs. Masked positions may hold anything
(even -inf in old_logprobs): they are selected away with torch.where, never multiplied by 0.
Normalisers (num_sequences, num_items) may be given as global counts so that gradient accumulation over
micro-batches, or data parallelism, equals one big batch.
"""
from __future__ import annotations

import torch

from ._checks import check_count, check_grpo_options, check_length_norm, check_policy_inputs, check_positive
from ._checks import check_sequence_tau, check_weights

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def pmd_divisor(length_norm, lengths: torch.Tensor) -> torch.Tensor | float:
    """Per-sequence divisor: token count (True), 1 (False) or a given constant (a number, e.g. max length)."""
    length_norm = check_length_norm(length_norm)
    if length_norm is True:
        return lengths.clamp(min=1)
    if length_norm is False:
        return 1.0
    return length_norm


def count_or(value, fallback: torch.Tensor, name: str) -> torch.Tensor | float:
    """A global normaliser; see fastpmd._checks.check_count (tensors are checked only under the switch)."""
    return check_count(name, value, fallback)


def masked_stats(x: torch.Tensor, valid: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    """Mean / min / max of x [B] over valid [B] entries, without host syncs (0 when nothing is valid)."""
    x = x.detach().float()
    cnt = valid.sum()
    any_valid = cnt > 0
    mean = torch.where(valid, x, 0.0).sum() / cnt.clamp(min=1)
    pad = x.new_zeros(1)  # an empty batch has no min/max: reduce over one extra (discarded) element
    lo = torch.cat([torch.where(valid, x, float("inf")), pad + float("inf")]).min()
    hi = torch.cat([torch.where(valid, x, float("-inf")), pad - float("inf")]).max()
    zero = torch.zeros((), device=x.device)
    return {
        f"{prefix}_mean": mean,
        f"{prefix}_min": torch.where(any_valid, lo, zero),
        f"{prefix}_max": torch.where(any_valid, hi, zero),
    }


def sequence_logratio(logprobs, old_logprobs, mask) -> torch.Tensor:
    """Delta [B] = sum_t mask * (logprobs - old_logprobs)."""
    return torch.where(mask, logprobs - old_logprobs.to(logprobs.dtype), 0.0).sum(-1)


def pmd_loss(
    logprobs: torch.Tensor,  # [B, T]
    old_logprobs: torch.Tensor,  # [B, T]
    advantages: torch.Tensor,  # [B]
    mask: torch.Tensor,  # [B, T]
    *,
    tau: float | torch.Tensor,  # a number or [B] (per sequence)
    length_norm: bool | float = True,
    num_sequences: int | float | torch.Tensor | None = None,
    weights: torch.Tensor | None = None,  # [B] per-sequence weights (rollout correction), constants
):
    """PMD regression in log-policy space.

    Delta_i = sum_t mask*(logprobs - old_logprobs); per sequence (A_i - tau*Delta_i)^2 / (2*tau), divided by the
    sequence's token count (length_norm=True), by a constant (a number) or not at all (False); summed over
    sequences with at least one token and divided by num_sequences (default: their count). The gradient per
    token is -(A_i - tau*Delta_i) / divisor_i / num_sequences. ``weights`` w_i multiply sequence i's term.
    tau may be a [B] tensor: tau_i per sequence.
    """
    mask = check_policy_inputs(logprobs, old_logprobs, advantages, mask)
    tau = check_sequence_tau(tau, logprobs.shape[0])
    lengths = mask.sum(-1)
    valid = lengths > 0
    delta = sequence_logratio(logprobs, old_logprobs, mask)  # [B]
    if isinstance(tau, torch.Tensor):
        tau = tau.to(delta.dtype)
    resid = advantages.to(delta.dtype) - tau * delta
    per_seq = torch.where(valid, resid.square() / (2 * tau) / pmd_divisor(length_norm, lengths), 0.0)
    if weights is not None:
        per_seq = per_seq * check_weights(weights, advantages.shape).to(per_seq.dtype)
    loss = per_seq.sum() / count_or(num_sequences, valid.sum(), "num_sequences")
    return loss, pmd_metrics(loss, delta, resid, advantages, lengths)


def pmd_metrics(loss, delta, resid, advantages, lengths) -> dict[str, torch.Tensor]:
    """Detached PMD metrics from per-sequence delta, residual A - tau*delta, advantages and token counts [B].
    As the released code logs them: ppo_kl = mean_i(-delta_i / len_i), and seq_ratio_{mean,min,max} of exp(delta)."""
    valid = lengths > 0
    metrics = {"loss": loss.detach(), "num_tokens": lengths.sum().detach().float()}
    metrics.update(masked_stats(delta, valid, "logratio"))
    metrics["ppo_kl"] = masked_stats(-delta.detach() / lengths.clamp(min=1), valid, "k")["k_mean"]
    metrics.update(masked_stats(torch.exp(delta.detach().float()), valid, "seq_ratio"))
    metrics["residual_abs_mean"] = masked_stats(resid.abs(), valid, "r")["r_mean"]
    metrics["advantage_abs_mean"] = masked_stats(advantages.abs(), valid, "a")["a_mean"]
    return metrics


def _aggregate(per_token, mask, loss_type: str, max_completion_length, num_items):
    """TRL's aggregations of a per-token loss [B, T] over the mask."""
    tok = torch.where(mask, per_token, 0.0)
    rows = max(mask.shape[0], 1)  # B = 0 (an empty micro-batch) gives 0, not 0/0 (no host sync: a shape)
    if loss_type == "grpo":
        per_seq = tok.sum(-1) / mask.sum(-1).clamp(min=1)
        return per_seq.mean() if mask.shape[0] else per_seq.sum()
    if loss_type == "bnpo":
        return tok.sum() / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        length = max_completion_length if max_completion_length is not None else mask.shape[1]
        return tok.sum() / (rows * check_positive("max_completion_length", length))
    return tok.sum() / count_or(num_items, mask.sum(), "num_items")  # dapo: global active tokens


def grpo_loss(
    logprobs: torch.Tensor,  # [B, T]
    old_logprobs: torch.Tensor | None,  # [B, T]; None = on-policy (logprobs.detach())
    advantages: torch.Tensor,  # [B]
    mask: torch.Tensor,  # [B, T]
    *,
    loss_type: str = "grpo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,  # [B, T], needed when beta != 0
    max_completion_length: int | None = None,
    num_items: int | float | torch.Tensor | None = None,
    importance_sampling_level: str = "token",
    weights: torch.Tensor | None = None,  # [B, T] per-token weights (rollout correction), constants
):
    """Clipped-ratio policy loss, as TRL's GRPOTrainer and Liger's LigerFusedLinearGRPOLoss compute it.

    ratio = exp(logprobs - old) per token ("token") or exp(mean_t(logprobs - old)) per sequence ("sequence",
    GSPO); per-token loss -min(ratio*A, clip(ratio, 1-eps_low, 1+eps_high)*A) (+ beta * k3 KL to ref);
    aggregated by loss_type: grpo (per-sequence token mean, then mean), bnpo (sum / tokens in batch),
    dr_grpo (sum / (B * max_completion_length)), dapo (sum / num_items, the global token count).
    ``weights`` multiply the per-token policy term (before the KL term), e.g. truncated IS weights.
    """
    mask = check_policy_inputs(logprobs, old_logprobs, advantages, mask, old_required=False,
                               ref_logprobs=ref_logprobs if beta != 0.0 else None)
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    epsilon_low, epsilon_high = check_grpo_options(epsilon_low, epsilon_high, beta, ref_logprobs,
                                                   max_completion_length, num_items)
    old = logprobs.detach() if old_logprobs is None else old_logprobs.to(logprobs.dtype)
    log_ratio = torch.where(mask, logprobs - old, 0.0)  # [B, T]
    if importance_sampling_level == "sequence":
        log_ratio = (log_ratio.sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1)  # [B, 1]
    coef1 = torch.exp(log_ratio)
    coef2 = coef1.clamp(1 - epsilon_low, 1 + epsilon_high)
    adv = advantages.to(logprobs.dtype).unsqueeze(1)
    per_token = -torch.minimum(coef1 * adv, coef2 * adv).expand_as(logprobs)
    if weights is not None:
        per_token = per_token * check_weights(weights, logprobs.shape).to(per_token.dtype)
    if beta != 0.0:
        d = torch.where(mask, ref_logprobs.to(logprobs.dtype) - logprobs, 0.0)
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
    loss = _aggregate(per_token, mask, loss_type, max_completion_length, num_items)

    m = mask.float()
    ntok = m.sum().clamp(min=1)
    low = ((coef1 < 1 - epsilon_low) & (adv < 0)).float().expand_as(m)
    high = ((coef1 > 1 + epsilon_high) & (adv > 0)).float().expand_as(m)
    metrics = {
        "loss": loss.detach(),
        "clip_ratio_low": (low * m).sum() / ntok,
        "clip_ratio_high": (high * m).sum() / ntok,
        "ratio_mean": (coef1.detach().expand_as(m) * m).sum() / ntok,
        "num_tokens": m.sum(),
    }
    if beta != 0.0:
        metrics["kl_mean"] = (kl.detach() * m).sum() / ntok
    metrics.update(masked_stats(sequence_logratio(logprobs, old, mask), mask.any(-1), "logratio"))
    return loss, metrics


def gspo_loss(logprobs, old_logprobs, advantages, mask, *, epsilon_low: float = 3e-4, epsilon_high: float = 4e-4,
              loss_type: str = "grpo", **kwargs):
    """GSPO: grpo_loss with the sequence-level ratio exp(mean_t(logprobs - old)) and epsilons 3e-4 / 4e-4."""
    return grpo_loss(logprobs, old_logprobs, advantages, mask, loss_type=loss_type, epsilon_low=epsilon_low,
                     epsilon_high=epsilon_high, importance_sampling_level="sequence", **kwargs)


def pg_loss(
    logprobs: torch.Tensor,  # [B, T]
    old_logprobs: torch.Tensor | None,  # [B, T], only for the log-ratio metrics
    advantages: torch.Tensor,  # [B], RLOO advantages (estimator "loo")
    mask: torch.Tensor,  # [B, T]
    *,
    length_norm: bool | float = True,
    num_sequences: int | float | torch.Tensor | None = None,
):
    """On-policy policy gradient (REINFORCE with RLOO advantages, length-normalised):
    loss = -sum_i A_i * sum_t mask*logprobs / divisor_i / num_sequences. Its gradient equals PMD-mean's at Delta=0."""
    mask = check_policy_inputs(logprobs, old_logprobs, advantages, mask, old_required=False)
    lengths = mask.sum(-1)
    valid = lengths > 0
    seq_logp = torch.where(mask, logprobs, 0.0).sum(-1)
    per_seq = torch.where(valid, -advantages.to(seq_logp.dtype) * seq_logp / pmd_divisor(length_norm, lengths), 0.0)
    loss = per_seq.sum() / count_or(num_sequences, valid.sum(), "num_sequences")
    metrics = {"loss": loss.detach(), "num_tokens": lengths.sum().detach().float()}
    if old_logprobs is not None:
        metrics.update(masked_stats(sequence_logratio(logprobs, old_logprobs, mask), valid, "logratio"))
    return loss, metrics
