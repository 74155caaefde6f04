"""Policy losses on per-token log-probs: PMD (mean / partition targets), GRPO, GSPO and on-policy PG.

Every loss takes (logprobs [B, T], old_logprobs [B, T], advantages [B], mask [B, T]) and returns
(loss 0-d, metrics: dict of detached 0-d tensors). No host syncs. Masked positions may hold anything
(even -inf in old_logprobs): they are selected away with torch.where, never multiplied by 0.
Normalisers (num_sequences, num_items) may be given as global counts so that gradient accumulation over
micro-batches, or data parallelism, equals one big batch.
"""
from __future__ import annotations

import math

import torch

from ._checks import check_count, check_grpo_options, check_length_norm, check_policy_inputs, check_positive
from ._checks import check_same_shape, check_sequence_tau, check_tensor, check_weights

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def length_divisor(length_norm, lengths: torch.Tensor) -> torch.Tensor | float:
    """Per-sequence divisor: token count (True), 1 (False) or a given constant (a number, e.g. max length)."""
    length_norm = check_length_norm(length_norm)
    if length_norm is True:
        return lengths.clamp(min=1)
    if length_norm is False:
        return 1.0
    return length_norm


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


def pmd_objective(adv, delta, tau, divisor, valid, num_sequences):
    """The PMD regression from per-sequence values [B], written once in torch (kernels/pmd_epilogue.py is its
    Triton twin): resid = A - tau*Delta; loss = sum over valid sequences of resid^2 / (2*tau) / divisor, divided by
    num_sequences. Returns (loss, resid)."""
    resid = adv - tau * delta
    return torch.where(valid, resid.square() / (2 * tau) / divisor, 0.0).sum() / num_sequences, resid


def pmd_delta_grad(adv, delta, tau, divisor, num_sequences):
    """d loss / d Delta_i = -(A_i - tau*Delta_i) / divisor_i / num_sequences (also d loss / d logp of each token)."""
    return -(adv - tau * delta) / divisor / num_sequences


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
    tau = check_sequence_tau(tau, logprobs.shape[0], logprobs.device)
    lengths = mask.sum(-1)
    valid = lengths > 0
    delta = sequence_logratio(logprobs, old_logprobs, mask)  # [B]
    if isinstance(tau, torch.Tensor):
        tau = tau.to(delta.dtype)
    divisor = length_divisor(length_norm, lengths)
    if weights is not None:  # w * term / d == term / (d / w), as in the fused paths
        divisor = divisor / check_weights(weights, advantages.shape, logprobs.device).to(delta.dtype)
    loss, resid = pmd_objective(advantages.to(delta.dtype), delta, tau, divisor, valid,
                                check_count("num_sequences", num_sequences, valid.sum()))
    return loss, pmd_metrics(loss, delta, resid, advantages, lengths)


def pmd_metrics(loss, delta, resid, advantages, lengths) -> dict[str, torch.Tensor]:
    """Detached PMD metrics from per-sequence delta, residual A - tau*delta, advantages and token counts [B].
    As the released code logs them: ppo_kl = mean_i(-delta_i / len_i), and seq_ratio_{mean,min,max} of exp(delta)."""
    valid = lengths > 0
    metrics = {"loss": loss.detach(), "num_tokens": lengths.sum().detach().float()}
    metrics.update(masked_stats(delta, valid, "logratio"))
    metrics["ppo_kl"] = masked_stats(-delta.detach() / lengths.clamp(min=1), valid, "k")["k_mean"]
    metrics.update(masked_stats(capped_exp(delta.detach().float()), valid, "seq_ratio"))
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
    return tok.sum() / check_count("num_items", num_items, mask.sum())  # dapo: global active tokens


def log_ratio_max(dtype: torch.dtype) -> float:
    """The largest log-ratio a loss or metric exponentiates: half the dtype's log-max (44.4 for float32/bfloat16,
    5.5 for float16, 354.9 for float64), so exp(it) times an advantage, summed over a batch, stays finite. Only a
    stale or broken old log-prob (pi/pi_old > e^44) reaches it."""
    return 0.5 * math.log(torch.finfo(dtype).max)


def capped_exp(log_ratio: torch.Tensor) -> torch.Tensor:
    """exp(min(log_ratio, log_ratio_max)): a ratio that never overflows (no gradient past the cap)."""
    return torch.exp(log_ratio.clamp(max=log_ratio_max(log_ratio.dtype)))


def _log_ratio_cap(adv: torch.Tensor, epsilon_high: float, delta: float | None) -> torch.Tensor:
    """Per-sequence cap [B, 1] on the log-ratio past which the clipped surrogate no longer depends on it: A >= 0
    takes the constant clip branch beyond 1+eps_high, A < 0 the constant delta beyond delta. One unit of margin
    keeps the cap strictly inside the constant region (values and gradients unchanged). A < 0 without delta has
    no constant region: its cap is log_ratio_max (the term's exact value would overflow the dtype)."""
    big = log_ratio_max(adv.dtype)
    pos_cap = min(math.log1p(epsilon_high) + 1.0, big)
    neg_cap = big if delta is None else min(math.log(delta) + 1.0, big)
    return torch.where(adv >= 0, pos_cap, neg_cap).to(adv.dtype)


def _check_policy_weights(weights, entropy_mask, logprobs, mask, delta):
    """weights [B, T] or [B, 1] (check_weights); entropy_mask [B, T] bool or 0/1 integer; delta > 0 or None."""
    shape = logprobs.shape
    if delta is not None:
        check_positive("delta", delta)
    if weights is not None:
        weights = check_weights(weights, shape, logprobs.device, mask, per_token=True)
    if entropy_mask is not None:
        check_tensor("entropy_mask", entropy_mask, dims=2)
        check_same_shape("entropy_mask", entropy_mask, "logprobs", shape)
        if entropy_mask.is_floating_point():
            raise ValueError(f"entropy_mask must be bool or integer 0/1, got {entropy_mask.dtype}")
        entropy_mask = entropy_mask if entropy_mask.dtype == torch.bool else entropy_mask != 0
    return weights, entropy_mask


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
    delta: float | None = None,
    bias_correction_kl: bool = False,
    weights: torch.Tensor | None = None,  # [B, T] or [B, 1]
    entropy_mask: torch.Tensor | None = None,  # [B, T] bool
):
    """Clipped-ratio policy loss, as TRL's GRPOTrainer and Liger's LigerFusedLinearGRPOLoss compute it.

    ratio = exp(logprobs - old) per token ("token") or exp(mean_t(logprobs - old)) per sequence ("sequence",
    GSPO); policy term -min(min(ratio, delta)*A, clip(ratio, 1-eps_low, 1+eps_high)*A) (delta: TRL's two-sided
    clipping, None = off), times entropy_mask (TRL's top_entropy_quantile tokens) and per-token weights (TRL's
    vLLM importance-sampling ratio); plus beta * k3 KL to ref (times ratio with bias_correction_kl, TRL's
    use_bias_correction_kl, default True there). Aggregated over `mask` by loss_type: grpo (per-sequence token
    mean, then mean), bnpo (sum / tokens in batch), dr_grpo (sum / (B * max_completion_length)), dapo (sum /
    num_items, the global token count); the masks never change the normaliser.
    The surrogate never forms inf: the log-ratio is capped where the clip makes it irrelevant (A >= 0: one above
    log(1+eps_high); A < 0 with delta: one above log(delta)), so values and gradients equal the exact ones; A < 0
    without delta, the ratio in the metrics and the KL's bias correction cap it at log_ratio_max (44.4 in
    float32: a ratio past e^44, only from a stale old log-prob, counts as e^44 with no gradient, not as inf).
    """
    mask = check_policy_inputs(logprobs, old_logprobs, advantages, mask, old_required=False,
                               ref_logprobs=ref_logprobs if beta != 0.0 else None)
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    epsilon_low, epsilon_high = check_grpo_options(epsilon_low, epsilon_high, beta, ref_logprobs,
                                                   max_completion_length, num_items)
    weights, entropy_mask = _check_policy_weights(weights, entropy_mask, logprobs, mask, delta)
    old = logprobs.detach() if old_logprobs is None else old_logprobs.to(logprobs.dtype)
    log_ratio = torch.where(mask, logprobs - old, 0.0)  # [B, T]
    if importance_sampling_level == "sequence":
        log_ratio = (log_ratio.sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1)  # [B, 1]
    adv = advantages.to(logprobs.dtype).unsqueeze(1)  # [B, 1]
    coef1 = torch.exp(log_ratio.clamp(max=_log_ratio_cap(adv, epsilon_high, delta)))  # finite where it matters
    coef2 = coef1.clamp(1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        coef1 = coef1.clamp(max=delta)
    policy = -torch.minimum(coef1 * adv, coef2 * adv)  # [B, T] or [B, 1]
    if entropy_mask is not None:
        policy = torch.where(entropy_mask, policy, 0.0)
    if weights is not None:
        policy = policy * weights.to(policy.dtype)
    per_token = policy.expand_as(logprobs)
    ratio = capped_exp(log_ratio)  # metrics and the KL's bias correction (finite for a stale old log-prob)
    if beta != 0.0:
        d = torch.where(mask, ref_logprobs.to(logprobs.dtype) - logprobs, 0.0)
        kl = torch.exp(d) - d - 1
        if bias_correction_kl:  # the capped ratio: kl = 0 there gives 0, not inf * 0
            kl = kl * ratio
        per_token = per_token + beta * kl
    loss = _aggregate(per_token, mask, loss_type, max_completion_length, num_items)

    m = mask.float()
    ntok = m.sum().clamp(min=1)
    ratio = ratio.detach()
    low = ((ratio < 1 - epsilon_low) & (adv < 0)).float().expand_as(m)
    high = ((ratio > 1 + epsilon_high) & (adv > 0)).float().expand_as(m)
    metrics = {
        "loss": loss.detach(),
        "clip_ratio_low": (low * m).sum() / ntok,
        "clip_ratio_high": (high * m).sum() / ntok,
        "ratio_mean": torch.where(mask, ratio.expand_as(m), 0.0).sum() / ntok,
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
    per_seq = torch.where(valid, -advantages.to(seq_logp.dtype) * seq_logp / length_divisor(length_norm, lengths), 0.0)
    loss = per_seq.sum() / check_count("num_sequences", num_sequences, valid.sum())
    metrics = {"loss": loss.detach(), "num_tokens": lengths.sum().detach().float()}
    if old_logprobs is not None:
        metrics.update(masked_stats(sequence_logratio(logprobs, old_logprobs, mask), valid, "logratio"))
    return loss, metrics
