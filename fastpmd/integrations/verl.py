"""verl integration: PMD-mean and PMD-part as verl policy losses, by a config switch.

    import fastpmd.integrations.verl   # registers on import, in the entry script (as the released code does)
    actor_rollout_ref.actor.policy_loss.loss_mode=pmd_mean  algorithm.adv_estimator=rloo          # PMD-mean
    actor_rollout_ref.actor.policy_loss.loss_mode=pmd_part  algorithm.adv_estimator=pmd_partition  # PMD-part

Policy losses "pmd_mean" and "pmd_part" (one formula; they differ in the advantages) are computed by
fastpmd.pmd_loss from verl's (old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config):
    A_i = token mean of advantages over the response; Delta_i = sum_t mask*(log_prob - old_log_prob)
    loss = sum_i (A_i - tau*Delta_i)^2 / (2*tau) / divisor_i / num_sequences
loss_agg_mode picks divisor and normaliser: seq-mean-token-mean (divisor |y_i|, the released OpenKimi loss),
seq-mean-token-sum-norm (divisor loss_scale_factor or the padded length), seq-mean-token-sum (1), token-mean
(1, normalised by the token count), token-sum (1, not normalised; times dp_size as verl's agg_loss). Each mode
equals verl's agg_loss over a loss matrix that spreads sequence i's term evenly over its tokens. verl's
global_batch_info (dp_size, global_batch_size, batch_num_tokens) gives the global normalisers. tau: `pmd_tau` in
config.policy_loss (or the actor config), else $FASTPMD_PMD_TAU, else register()'s; each >= 1e-8.
Advantage estimators "pmd_partition" / "pmd_partition_loo": fastpmd.advantages per prompt group (verl's uid).
Importing this module needs verl (its policy-loss registry, verl.trainer.ppo.core_algos).
"""
from __future__ import annotations

import os
from collections import defaultdict

import numpy as np
import torch

try:
    from verl.trainer.ppo import core_algos
except ImportError as e:  # pragma: no cover - exercised only without verl
    raise ImportError("fastpmd.integrations.verl needs verl: pip install --no-deps verl && pip install ray "
                      "'tensordict<=0.10.0' omegaconf hydra-core codetiming orjson (see docs/API.md)") from e

from .. import advantages as group_advantages
from .._checks import check_tau
from ..logprobs import linear_logprobs
from ..losses import pmd_loss
from ._hf import check_supported

LOSS_NAMES = ("pmd_mean", "pmd_part")
AGG_MODES = ("seq-mean-token-mean", "seq-mean-token-sum-norm", "seq-mean-token-sum", "token-mean", "token-sum")
ESTIMATOR_NAMES = {"pmd_partition": "partition", "pmd_partition_loo": "partition_loo"}
_DEFAULT = {"pmd_tau": 0.01}


def _get(cfg, key):
    if cfg is None:
        return None
    getter = getattr(cfg, "get", None)
    return getter(key, None) if callable(getter) else getattr(cfg, key, None)


def pmd_tau(config) -> float:
    """`pmd_tau` from config.policy_loss or the actor config (a DictConfig, or a fork's dataclass with the field),
    else $FASTPMD_PMD_TAU (reaches Ray workers through runtime_env; stock verl's dataclass ActorConfig rejects
    unknown keys), else register()'s default (0.01, the released scripts' value)."""
    for src in (_get(config, "policy_loss"), config):
        tau = _get(src, "pmd_tau")
        if tau is not None:
            return _checked_tau("pmd_tau", tau)
    env = _env_tau()
    return _DEFAULT["pmd_tau"] if env is None else env


def _checked_tau(name: str, raw) -> float:
    """A tau from a config value or an environment string: a number >= TAU_MIN, else ValueError naming `name`."""
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number such as 0.01 (a '.' decimal point), got {raw!r}") from None
    return check_tau(value, name)


def _env_tau() -> float | None:
    """$FASTPMD_PMD_TAU checked (None when unset or empty)."""
    raw = os.environ.get("FASTPMD_PMD_TAU", "").strip()
    return _checked_tau("FASTPMD_PMD_TAU", raw) if raw else None


def _normalisers(loss_agg_mode: str, mask: torch.Tensor, config):
    """(length_norm, num_sequences) of fastpmd.pmd_loss that reproduce verl's aggregation modes."""
    info = _get(config, "global_batch_info") or {}
    dp = info.get("dp_size", 1) or 1
    if loss_agg_mode == "token-mean":
        n_tok = info.get("batch_num_tokens")
        return False, (float(n_tok) / dp if n_tok is not None else mask.sum().clamp(min=1))
    gbs = info.get("global_batch_size")
    num_seq = float(gbs) / dp if gbs is not None else None
    if loss_agg_mode == "seq-mean-token-mean":
        return True, num_seq
    if loss_agg_mode == "seq-mean-token-sum":
        return False, num_seq
    if loss_agg_mode == "seq-mean-token-sum-norm":
        return float(info.get("loss_scale_factor") or _get(config, "loss_scale_factor") or mask.shape[-1]), num_seq
    if loss_agg_mode == "token-sum":  # verl: the local sum times dp_size (DP averages it back to the global sum)
        return False, 1.0 / dp
    raise ValueError(f"loss_agg_mode {loss_agg_mode!r} is not supported by pmd_mean/pmd_part; use one of "
                     f"{AGG_MODES}")


def compute_policy_loss_pmd(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="seq-mean-token-mean",
                            config=None, rollout_is_weights=None, **kwargs):
    """verl PolicyLossFn: tensors [B, T] (advantages token-level, constant per response) -> (loss, metrics)."""
    if rollout_is_weights is not None:
        raise ValueError("pmd_mean/pmd_part do not take rollout importance weights (rollout_correction); "
                         "PMD regresses on log-ratios to the recomputed old log-probs")
    mask = response_mask.bool()
    lengths = mask.sum(-1).clamp(min=1)
    seq_adv = torch.where(mask, advantages, 0.0).sum(-1) / lengths  # [B]
    length_norm, num_seq = _normalisers(loss_agg_mode, mask, config)
    loss, m = pmd_loss(log_prob, old_log_prob, seq_adv, mask, tau=pmd_tau(config), length_norm=length_norm,
                       num_sequences=num_seq)
    token_kl = -torch.where(mask, log_prob - old_log_prob, 0.0).sum(-1).detach() / lengths  # [B], as released
    metrics = {"actor/pg_clipfrac": 0.0, "actor/pg_clipfrac_lower": 0.0, "actor/ppo_kl": float(token_kl.mean())}
    metrics.update({f"actor/pmd_{k}": float(m[k]) for k in ("logratio_min", "logratio_mean", "logratio_max",
                                                             "residual_abs_mean")})
    return loss, metrics


def compute_partition_advantage(token_level_rewards, response_mask, index, config=None, estimator="partition",
                                **kwargs):
    """verl AdvantageEstimator: fastpmd.advantages(estimator, tau) within each prompt group (index = uid)."""
    tau = _get(config, "pmd_tau") or _get(config, "partition_tau") or _DEFAULT["pmd_tau"]
    scores = token_level_rewards.sum(-1)  # [B]
    groups = defaultdict(list)
    for i, uid in enumerate(np.asarray(index).tolist()):
        groups[uid].append(i)
    adv = torch.zeros_like(scores)
    for rows in groups.values():
        if len(rows) < 2:
            raise ValueError("pmd partition advantages need at least 2 responses per prompt (rollout.n >= 2)")
        idx = torch.tensor(rows, device=scores.device)
        adv[idx] = group_advantages(scores[idx], group_size=len(rows), estimator=estimator, tau=float(tau))
    adv = adv.unsqueeze(-1) * response_mask
    return adv, adv


def _estimator(name):
    def fn(token_level_rewards, response_mask, index, config=None, **kwargs):
        return compute_partition_advantage(token_level_rewards, response_mask, index, config,
                                           estimator=ESTIMATOR_NAMES[name])
    fn.__name__ = f"compute_{name}_advantage"
    return fn


_ESTIMATORS = {name: _estimator(name) for name in ESTIMATOR_NAMES}


def register(pmd_tau: float | None = None) -> None:
    """Register the policy losses pmd_mean / pmd_part and the estimators pmd_partition / pmd_partition_loo in
    verl's registries (idempotent). pmd_tau: the default tau when the config carries none. Checks
    $FASTPMD_PMD_TAU here, so a bad value fails at import (naming the variable), not at the first loss."""
    if pmd_tau is not None:
        _DEFAULT["pmd_tau"] = check_tau(pmd_tau, "pmd_tau")
    _env_tau()
    for name in LOSS_NAMES:
        core_algos.register_policy_loss(name)(compute_policy_loss_pmd)
    for name, fn in _ESTIMATORS.items():
        if core_algos.ADV_ESTIMATOR_REGISTRY.get(name) is not fn:
            core_algos.register_adv_est(name)(fn)


def forward_for_ppo(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                    inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                    output_hidden_states=None, return_dict=None, cache_position=None, logits_to_keep=0,
                    temperature=1.0, shift_labels=None, **loss_kwargs):
    """verl's fused-kernel forward contract (`use_fused_kernels=True`: log_probs and entropy [B, S] of the next
    token, no logits) computed by fastpmd.linear_logprobs. Install with use_fastpmd_head(model)."""
    from verl.models.transformers.dense_common import CausalLMOutputForPPO

    check_supported(self, {})
    out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                          output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                          cache_position=cache_position)
    if shift_labels is not None:
        rolled = shift_labels
    else:
        rolled = torch.roll(labels if labels is not None else input_ids, shifts=-1, dims=-1)  # [B, S]
    valid = rolled >= 0  # -100 labels score 0
    head = self.get_output_embeddings()
    logp, ent = linear_logprobs(out.last_hidden_state, head.weight, rolled.clamp(min=0), mask=valid,
                                bias=head.bias, temperature=temperature, return_entropy=True)
    return CausalLMOutputForPPO(log_probs=logp, entropy=ent, past_key_values=out.past_key_values,
                                hidden_states=out.hidden_states, attentions=out.attentions)


def use_fastpmd_head(model) -> None:
    """Make a Hugging Face causal LM answer verl's fused-kernel forward with fastpmd's LM head (this instance only;
    call it where verl would apply its own fused forward, with use_fused_kernels=True)."""
    model.forward = forward_for_ppo.__get__(model)


register()
