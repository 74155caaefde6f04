"""fastpmd: fused LM-head log-probs and policy losses for RL post-training with PMD-mean.

Public API (stable names; see docs/API.md):
    linear_logprobs, fused_linear_pmd_loss              hidden states -> log-probs / PMD loss, no [N, V] logits
    advantages                                          group advantages (mean, loo, partition[_loo[_clamped]], grpo)
    pmd_loss, grpo_loss, gspo_loss, pg_loss             (logprobs, old_logprobs, advantages, mask) -> (loss, metrics)
    cispo_loss, sapo_loss, luspo_loss                   TRL's other loss types, same signature
    LossConfig, compute_loss, advantages_for, loss_tau  losses chosen by name (loss_tau: per-prompt tau schedule)
    LOSS_NAMES, LossSpec                                the loss registry (fastpmd/registry.py): one entry per loss
    finite_checks, TAU_MIN                              opt-in NaN/inf input checks; the smallest tau
    truncated_is_weights                                rollout correction (TIS) weights for the losses' weights=
    nn.FusedLinearPMDLoss                               the fused loss as a torch.nn.Module
"""
from ._checks import TAU_MIN, finite_checks
from .advantages import ESTIMATORS, advantages
from .correction import truncated_is_weights
from .fused import fused_linear_pmd_loss
from .logprobs import linear_logprobs
from .losses import grpo_loss, gspo_loss, pg_loss, pmd_loss
from .losses_trl import cispo_loss, luspo_loss, sapo_loss
from .objectives import LOSS_NAMES, LossConfig, advantages_for, compute_loss, loss_tau
from .registry import LossSpec
from . import nn  # fastpmd.nn.FusedLinearPMDLoss after `import fastpmd` alone

__version__ = "0.1.0"

__all__ = [
    "ESTIMATORS", "LOSS_NAMES", "TAU_MIN", "LossConfig", "LossSpec", "advantages", "advantages_for", "compute_loss",
    "loss_tau", "finite_checks", "cispo_loss", "luspo_loss", "sapo_loss",
    "fused_linear_pmd_loss", "grpo_loss", "gspo_loss", "linear_logprobs", "pg_loss", "pmd_loss",
    "nn", "truncated_is_weights",
]
