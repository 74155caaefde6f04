"""Losses chosen by name: one frozen config for the non-tensor options, shared by the trainer and the bench."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ._checks import check_backend, check_chunk_size, check_loss_config_fields, check_positive
from .advantages import advantages
from .losses import GRPO_LOSS_TYPES
from .registry import LOSSES, LossSpec, check_options, get_spec
from .tau_schedule import TAU_SCHEDULES, sequence_tau

LOSS_NAMES = tuple(LOSSES)  # the registered losses (fastpmd/registry.py); a user's loss goes by import path


def check_estimator(name: str, estimator: str | None) -> str | None:
    """None when `estimator` (None = the default) fits loss `name`, else the error message."""
    allowed = get_spec(name).estimators
    if estimator is not None and estimator not in allowed:
        return f"estimator {estimator!r} does not fit loss {name!r}; choose one of {allowed}"
    return None


@dataclass(frozen=True)
class LossConfig:
    """Options of the policy loss.

    name: pmd-mean (the paper), pmd-part (log-partition target), grpo, gspo, pg (on-policy gradient), TRL's cispo,
        sapo, luspo (fastpmd/registry.py lists them), or a user's loss by import path: "my_loss.py:fn" or
        "package.module:fn", with fastpmd.pmd_loss's signature.
    tau: PMD temperature of the loss (regulariser strength; the released code's pmd_tau).
    partition_tau: temperature of the partition estimators (the released code's partition_tau); None = tau.
    tau_schedule: "none", or "mean-reward": a per-prompt loss tau from the group's mean reward
        (fastpmd.tau_schedule; the partition estimators then use it too unless partition_tau is set).
    estimator: advantage estimator; None picks the default of `name` (pmd-mean: "mean", pmd-part: "partition",
        grpo/gspo and the others: "grpo", pg: "loo"); the registry entry lists what each loss takes
        ("partition_loo_clamped" reproduces the released ploo, clamp included).
    length_norm: PMD/PG per-sequence divisor: token count (True), none (False) or a constant (a number).
    loss_type, epsilon_low, epsilon_high, beta: GRPO/GSPO options (TRL conventions); None epsilons take the
        loss's defaults (GRPO 0.2/0.2, GSPO 3e-4/4e-4).
    max_completion_length: dr_grpo's constant divisor.
    rollout_correction, rollout_is_cap: "tis" weights each term by the truncated importance ratio
        min(pi_old / pi_rollout, cap) from the rollout engine's log-probs (`truncated_is_weights`): per token for
        grpo/gspo, per sequence (the product over the response) for the PMD losses (the entry's `weights`);
        not for pg or a user's loss.
    backend, chunk_size: how the LM head runs when the loss starts from hidden states (`linear_logprobs`,
        `fused_linear_pmd_loss`): "auto" | "naive" | "torch" | "triton", tokens per chunk (None = default).
    options: more keyword options of the loss's function, e.g. {"temperature_pos": 1.0} for sapo, or a user
        loss's own (not those its fields set).
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
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        spec = get_spec(self.name)
        check_loss_config_fields(self)
        if self.tau_schedule not in TAU_SCHEDULES:
            raise ValueError(f"tau_schedule must be one of {TAU_SCHEDULES}, got {self.tau_schedule!r}")
        if (msg := check_estimator(self.name, self.estimator)) is not None:
            raise ValueError(msg)
        if self.loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {self.loss_type!r}")
        if self.rollout_correction not in ("none", "tis"):
            raise ValueError(f"rollout_correction must be 'none' or 'tis', got {self.rollout_correction!r}")
        if self.rollout_correction != "none" and spec.weights is None:
            raise ValueError(f"rollout_correction 'tis' applies to losses that take weights (pmd-mean, pmd-part, "
                             f"grpo, gspo, cispo, sapo, luspo), not {self.name!r}")
        check_positive("rollout_is_cap", self.rollout_is_cap)
        check_backend(self.backend)
        check_chunk_size(self.chunk_size)
        if not isinstance(self.options, dict):
            raise ValueError(f"options must be a dict, got {self.options!r}")
        check_options(spec, spec.options(self, self.tau), self.options)

    @property
    def spec(self) -> LossSpec:
        """This loss's registry entry (fastpmd/registry.py)."""
        return get_spec(self.name)

    @property
    def advantage_estimator(self) -> str:
        if self.estimator is not None:
            return self.estimator
        return self.spec.estimators[0]


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


def loss_options(cfg: LossConfig, *, num_sequences=None, num_items=None, ref_logprobs=None, weights=None,
                 tau: float | torch.Tensor | None = None) -> dict:
    """The keyword options of cfg's loss function (and of its fused path): the entry's options from the config,
    cfg.options, the global normaliser the entry takes, weights and ref_logprobs where given."""
    spec = cfg.spec
    opts = {**spec.options(cfg, cfg.tau if tau is None else tau), **cfg.options}
    normaliser = spec.normaliser_of(cfg)
    if normaliser == "sequences":
        opts["num_sequences"] = num_sequences
    elif normaliser == "tokens":
        opts["num_items"] = num_items
    if weights is not None:
        if spec.weights is None:
            raise ValueError(f"weights: the {cfg.name} loss takes no weights (rollout correction)")
        opts["weights"] = weights
    if ref_logprobs is not None:
        opts["ref_logprobs"] = ref_logprobs
    return opts


def compute_loss(cfg: LossConfig, logprobs, old_logprobs, adv, mask, *, num_sequences=None,
                 num_items=None, ref_logprobs=None, weights=None, tau: float | torch.Tensor | None = None):
    """The configured loss on per-token log-probs [B, T] (its registry entry's function); returns (loss, metrics).
    weights: per-sequence [B] or per-token [B, T], as the entry's `weights` says (rollout correction).
    tau: the PMD losses' temperature, a number or a [B] tensor (loss_tau); None = cfg.tau."""
    if not isinstance(cfg, LossConfig):
        raise ValueError(f"compute_loss: cfg must be a fastpmd.LossConfig, got {type(cfg).__name__} {cfg!r} "
                        f"(e.g. fastpmd.LossConfig(name={cfg!r}))")
    opts = loss_options(cfg, num_sequences=num_sequences, num_items=num_items, ref_logprobs=ref_logprobs,
                        weights=weights, tau=tau)
    return cfg.spec.fn(logprobs, old_logprobs, adv, mask, **opts)
