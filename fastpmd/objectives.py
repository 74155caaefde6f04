"""Losses chosen by name: one frozen config for the non-tensor options, shared by the trainer and the bench."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import check_loss_config_fields
from .advantages import advantages
from .losses import GRPO_LOSS_TYPES, grpo_loss, gspo_loss, pg_loss, pmd_loss

LOSS_NAMES = ("pmd-mean", "pmd-part", "grpo", "gspo", "pg")


@dataclass(frozen=True)
class LossConfig:
    """Options of the policy loss.

    name: pmd-mean (the paper), pmd-part (log-partition target), grpo, gspo, or pg (on-policy gradient).
    tau: PMD temperature (regulariser strength); also the partition estimators' temperature.
    estimator: advantage estimator; None picks the default of `name` (pmd-mean: "mean", pmd-part: "partition",
        grpo/gspo: "grpo", pg: "loo"). pmd-mean accepts "mean" or "loo"; pmd-part "partition" or "partition_loo".
    length_norm: PMD/PG per-sequence divisor: token count (True), none (False) or a constant (a number).
    loss_type, epsilon_low, epsilon_high, beta: GRPO/GSPO options (TRL conventions); None epsilons take the
        loss's defaults (GRPO 0.2/0.2, GSPO 3e-4/4e-4).
    max_completion_length: dr_grpo's constant divisor.
    """

    name: str = "pmd-mean"
    tau: float = 0.01
    estimator: str | None = None
    length_norm: bool | float = True
    loss_type: str = "grpo"
    epsilon_low: float | None = None
    epsilon_high: float | None = None
    beta: float = 0.0
    max_completion_length: int | None = None

    def __post_init__(self):
        if self.name not in LOSS_NAMES:
            raise ValueError(f"LossConfig.name must be one of {LOSS_NAMES}, got {self.name!r}")
        check_loss_config_fields(self)
        allowed = {"pmd-mean": ("mean", "loo"), "pmd-part": ("partition", "partition_loo"),
                   "grpo": ("grpo", "mean", "loo"), "gspo": ("grpo", "mean", "loo"), "pg": ("loo", "mean")}[self.name]
        if self.estimator is not None and self.estimator not in allowed:
            raise ValueError(f"estimator {self.estimator!r} does not fit loss {self.name!r}; choose one of {allowed}")
        if self.loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {self.loss_type!r}")

    @property
    def advantage_estimator(self) -> str:
        if self.estimator is not None:
            return self.estimator
        return {"pmd-mean": "mean", "pmd-part": "partition", "grpo": "grpo", "gspo": "grpo", "pg": "loo"}[self.name]

    @property
    def is_pmd(self) -> bool:
        return self.name.startswith("pmd")


def advantages_for(cfg: LossConfig, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Advantages [B] of rewards [B] (consecutive groups of group_size) for the configured loss."""
    return advantages(rewards, group_size=group_size, estimator=cfg.advantage_estimator, tau=cfg.tau)


def compute_loss(cfg: LossConfig, logprobs, old_logprobs, advantages_, mask, *, num_sequences=None,
                 num_items=None, ref_logprobs=None, weights=None):
    """Dispatch to the configured loss on per-token log-probs [B, T]; returns (loss, metrics).
    weights: per-sequence [B] for the PMD losses, per-token [B, T] for grpo/gspo (rollout correction)."""
    if not isinstance(cfg, LossConfig):
        raise TypeError(f"compute_loss: cfg must be a fastpmd.LossConfig, got {type(cfg).__name__} {cfg!r} "
                        f"(e.g. fastpmd.LossConfig(name={cfg!r}))")
    if cfg.is_pmd:
        return pmd_loss(logprobs, old_logprobs, advantages_, mask, tau=cfg.tau, length_norm=cfg.length_norm,
                        num_sequences=num_sequences, weights=weights)
    if weights is not None and cfg.name == "pg":
        raise ValueError("weights: the pg loss takes no weights (rollout correction is for pmd/grpo/gspo)")
    if cfg.name == "pg":
        return pg_loss(logprobs, old_logprobs, advantages_, mask, length_norm=cfg.length_norm,
                       num_sequences=num_sequences)
    fn = grpo_loss if cfg.name == "grpo" else gspo_loss
    eps = {}
    if cfg.epsilon_low is not None:
        eps["epsilon_low"] = cfg.epsilon_low
    if cfg.epsilon_high is not None:
        eps["epsilon_high"] = cfg.epsilon_high
    return fn(logprobs, old_logprobs, advantages_, mask, loss_type=cfg.loss_type, beta=cfg.beta,
              ref_logprobs=ref_logprobs, max_completion_length=cfg.max_completion_length, num_items=num_items,
              weights=weights, **eps)
