"""Group advantages: the per-sequence regression targets of PMD and the baselines' advantages.

rewards [B] holds consecutive groups of `group_size` responses to one prompt. Plain-PyTorch equivalents
(r = rewards.view(-1, n)):
    mean           r - r.mean(1)                                         (PMD-mean, the paper)
    loo            r_i - mean_{j != i} r_j = n/(n-1) * (r - r.mean(1))   (the paper's released code, "rloo")
    partition      r - tau * log(mean_j exp(r_j / tau))                  (PMD-part)
    partition_loo  r_i - tau * log(mean_{j != i} exp(r_j / tau))
    grpo           (r - r.mean(1)) / (r.std(1, unbiased=True) + eps)
Partition targets use logsumexp: exact and finite for tau = 0.01 and rewards in {-1, 1} (no clamp).
"""
from __future__ import annotations

import math

import torch

from ._checks import check_positive, check_tau, check_tensor

ESTIMATORS = ("mean", "loo", "partition", "partition_loo", "grpo")


def advantages(
    rewards: torch.Tensor,  # [B]
    *,
    group_size: int,
    estimator: str,
    tau: float | None = None,
    eps: float = 1e-4,
) -> torch.Tensor:  # [B] float32 (float64 for float64 rewards)
    check_tensor("rewards", rewards, dims=1)
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"group_size={group_size} does not divide the batch of {rewards.numel()} rewards")
    if estimator in ("loo", "partition_loo") and group_size < 2:
        raise ValueError(f"estimator={estimator!r} needs group_size >= 2, got {group_size}")
    if estimator.startswith("partition"):
        if tau is None:
            raise ValueError(f"estimator={estimator!r} needs tau")
        tau = check_tau(tau)
    if estimator == "grpo":
        eps = check_positive("eps", eps)  # eps = 0 turns a group of equal rewards into 0/0
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards must be finite (found NaN or inf)")

    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r = rewards.to(dtype).view(-1, group_size)  # [P, n]
    n = group_size
    if estimator == "mean":
        a = r - r.mean(1, keepdim=True)
    elif estimator == "loo":
        a = (r - r.mean(1, keepdim=True)) * (n / (n - 1))
    elif estimator == "grpo":
        std = r.std(1, keepdim=True, unbiased=True) if n > 1 else torch.zeros_like(r[:, :1])
        a = (r - r.mean(1, keepdim=True)) / (std + eps)
    elif estimator == "partition":
        a = r - tau * (torch.logsumexp(r / tau, 1, keepdim=True) - math.log(n))
    else:  # partition_loo: logsumexp over j != i, by masking the diagonal with -inf
        x = (r / tau).unsqueeze(1).expand(-1, n, -1)  # [P, n(i), n(j)]
        eye = torch.eye(n, dtype=torch.bool, device=r.device)
        lse = torch.logsumexp(x.masked_fill(eye, float("-inf")), dim=2)  # [P, n]
        a = r - tau * (lse - math.log(n - 1))
    return a.reshape(-1)
