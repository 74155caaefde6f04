"""Losses chosen by name: one frozen config for the non-tensor options, shared by the trainer and the bench."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import check_backend, check_chunk_size, check_loss_config_fields, check_positive
from .advantages import advantages
from .losses import GRPO_LOSS_TYPES, grpo_loss, gspo_loss, pg_loss, pmd_loss
from .tau_schedule import TAU_SCHEDULES, sequence_tau

LOSS_NAMES = ("pmd-mean", "pmd-part", "grpo", "gspo", "pg")
# estimators each loss takes (the first is its default); partition estimators only where the target is PMD-part
ALLOWED_ESTIMATORS = {
    "pmd-mean": ("mean", "loo"),
    "pmd-part": ("partition", "partition_loo", "partition_loo_clamped"),
    "grpo": ("grpo", "mean", "loo"), "gspo": ("grpo", "mean", "loo"), "pg": ("loo", "mean"),
}


def check_estimator(name: str, estimator: str | None) -> str | None:
    """None when `estimator` (None = the default) fits loss `name`, else the error message."""
    allowed = ALLOWED_ESTIMATORS.get(name, ())
    if estimator is not None and estimator not in allowed:
        return f"estimator {estimator!r} does not fit loss {name!r}; choose one of {allowed}"
    return None


@dataclass(frozen=True)
class LossConfig:
    """Options of the policy loss.

    name: pmd-mean (the paper), pmd-part (log-partition target), grpo, gspo, or pg (on-policy gradient).
    tau: PMD temperature of the loss (regulariser strength; the released code's pmd_tau).
    partition_tau: temperature of the partition estimators (the released code's partition_tau); None = tau.
    tau_schedule: "none", or "mean-reward": a per-prompt loss tau from the group's mean reward
        (fastpmd.tau_schedule; the partition estimators then use it too unless partition_tau is set).
    estimator: advantage estimator; None picks the default of `name` (pmd-mean: "mean", pmd-part: "partition",
        grpo/gspo: "grpo", pg: "loo"); ALLOWED_ESTIMATORS lists what each loss takes ("partition_loo_clamped"
        reproduces the released ploo, clamp included).
    length_norm: PMD/PG per-sequence divisor: token count (True), none (False) or a constant (a number).
    loss_type, epsilon_low, epsilon_high, beta: GRPO/GSPO options (TRL conventions); None epsilons take the
        loss's defaults (GRPO 0.2/0.2, GSPO 3e-4/4e-4).
    max_completion_length: dr_grpo's constant divisor.
    rollout_correction, rollout_is_cap: "tis" weights each term by the truncated importance ratio
        min(pi_old / pi_rollout, cap) from the rollout engine's log-probs (`truncated_is_weights`): per token for
        grpo/gspo, per sequence (the product over the response) for the PMD losses; not for pg.
    backend, chunk_size: how the LM head runs when the loss starts from hidden states (`linear_logprobs`,
        `fused_linear_pmd_loss`): "auto" | "naive" | "torch" | "triton", tokens per chunk (None = default).
    Every error names its field first ("tau must be ..."), so a config layer can prefix its section.
    """

    name: str = "pmd-mean"
    tau: float = 0.01
    estimator: str | None = None
    partition_tau: float | None = None
    tau_schedule: str = "none"
    length_norm: bool | float = True
    loss_type: str = "grpo"
    epsilon_low: float | None = None
    epsilon_high: float | None = None
    beta: float = 0.0
    max_completion_length: int | None = None
    rollout_correction: str = "none"
    rollout_is_cap: float = 2.0
    backend: str = "auto"
    chunk_size: int | None = None

    def __post_init__(self):
        if self.name not in LOSS_NAMES:
            raise ValueError(f"name must be one of {LOSS_NAMES}, got {self.name!r}")
        check_loss_config_fields(self)
        if self.tau_schedule not in TAU_SCHEDULES:
            raise ValueError(f"tau_schedule must be one of {TAU_SCHEDULES}, got {self.tau_schedule!r}")
        if (msg := check_estimator(self.name, self.estimator)) is not None:
            raise ValueError(msg)
        if self.loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {self.loss_type!r}")
        if self.rollout_correction not in ("none", "tis"):
            raise ValueError(f"rollout_correction must be 'none' or 'tis', got {self.rollout_correction!r}")
        if self.rollout_correction != "none" and self.name == "pg":
            raise ValueError("rollout_correction 'tis' applies to pmd-mean, pmd-part, grpo and gspo, not the "
                             "on-policy pg loss")
        check_positive("rollout_is_cap", self.rollout_is_cap)
        check_backend(self.backend)
        check_chunk_size(self.chunk_size)

    @property
    def advantage_estimator(self) -> str:
        if self.estimator is not None:
            return self.estimator
        return ALLOWED_ESTIMATORS[self.name][0]

    @property
    def is_pmd(self) -> bool:
        return self.name.startswith("pmd")


def loss_tau(cfg: LossConfig, rewards: torch.Tensor, group_size: int | None = None, *, group_ids=None,
             reward_range: tuple[float, float] = (0.0, 1.0)) -> float | torch.Tensor:
    """The loss temperature: cfg.tau, or with tau_schedule="mean-reward" a [B] tensor (one value per prompt;
    reward_range = (incorrect, correct) rewards)."""
    return sequence_tau(rewards, tau=cfg.tau, schedule=cfg.tau_schedule, low=reward_range[0], high=reward_range[1],
                        group_size=group_size, group_ids=group_ids)


def advantages_for(cfg: LossConfig, rewards: torch.Tensor, group_size: int | None = None, *, group_ids=None,
                   tau: float | torch.Tensor | None = None) -> torch.Tensor:
    """Advantages [B] of rewards [B] (consecutive groups of group_size, or group_ids) for the configured loss.
    Partition estimators use cfg.partition_tau if set, else `tau` (e.g. loss_tau's [B] tensor), else cfg.tau."""
    a_tau = cfg.partition_tau if cfg.partition_tau is not None else (cfg.tau if tau is None else tau)
    return advantages(rewards, group_size=group_size, group_ids=group_ids, estimator=cfg.advantage_estimator,
                      tau=a_tau)


def compute_loss(cfg: LossConfig, logprobs, old_logprobs, adv, mask, *, num_sequences=None,
                 num_items=None, ref_logprobs=None, weights=None, tau: float | torch.Tensor | None = None):
    """Dispatch to the configured loss on per-token log-probs [B, T]; returns (loss, metrics).
    weights: per-sequence [B] for the PMD losses, per-token [B, T] for grpo/gspo (rollout correction).
    tau: the PMD losses' temperature, a number or a [B] tensor (loss_tau); None = cfg.tau."""
    if not isinstance(cfg, LossConfig):
        raise ValueError(f"compute_loss: cfg must be a fastpmd.LossConfig, got {type(cfg).__name__} {cfg!r} "
                        f"(e.g. fastpmd.LossConfig(name={cfg!r}))")
    if cfg.is_pmd:
        return pmd_loss(logprobs, old_logprobs, adv, mask, tau=cfg.tau if tau is None else tau,
                        length_norm=cfg.length_norm, num_sequences=num_sequences, weights=weights)
    if weights is not None and cfg.name == "pg":
        raise ValueError("weights: the pg loss takes no weights (rollout correction is for pmd/grpo/gspo)")
    if cfg.name == "pg":
        return pg_loss(logprobs, old_logprobs, adv, mask, length_norm=cfg.length_norm,
                       num_sequences=num_sequences)
    fn = grpo_loss if cfg.name == "grpo" else gspo_loss
    eps = {}
    if cfg.epsilon_low is not None:
        eps["epsilon_low"] = cfg.epsilon_low
    if cfg.epsilon_high is not None:
        eps["epsilon_high"] = cfg.epsilon_high
    return fn(logprobs, old_logprobs, adv, mask, loss_type=cfg.loss_type, beta=cfg.beta,
              ref_logprobs=ref_logprobs, max_completion_length=cfg.max_completion_length, num_items=num_items,
              weights=weights, **eps)
