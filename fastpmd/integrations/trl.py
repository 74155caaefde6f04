"""TRL integration: GRPO-family training on fastpmd's LM head, and PMD-mean/PMD-part as a TRL trainer.

    FusedGRPOTrainer  TRL's GRPOTrainer (GRPO, DAPO, Dr.GRPO, GSPO, ... TRL's own loss) whose log-probs and entropies
                      come from fastpmd.linear_logprobs on the backbone's hidden states (no [tokens, vocab] logits).
    PMDConfig         GRPOConfig + tau, pmd_estimator (mean | loo | partition | partition_loo), length_norm.
    PMDTrainer        TRL's generation, rewards, num_iterations and logging; advantages by fastpmd.advantages
                      on the raw rewards of each group; loss fastpmd.fused_linear_pmd_loss on the hidden states.

`trl` is an optional dependency (`pip install 'fastpmd[trl]'`); importing this module without it raises ImportError
with that hint. Plain-PyTorch equivalent of PMDTrainer's loss on one micro-batch:
    logp = log_softmax(lm(ids).logits[:, -K-1:-1] / T).gather(completion_ids); loss = pmd_loss(logp, old, A, mask)
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

try:
    from trl import GRPOConfig, GRPOTrainer
except ImportError as e:  # pragma: no cover - exercised only without trl
    raise ImportError("fastpmd.integrations.trl needs TRL: pip install 'fastpmd[trl]' (or pip install trl)") from e

from .. import advantages as group_advantages
from .._checks import check_length_norm, check_tau
from ..fused import fused_linear_pmd_loss
from ..logprobs import linear_logprobs
from ._hf import causal_lm, check_supported, completion_hidden

# TRL >= 1.7 returns (logps, entropies, aux_loss) and takes compute_aux_loss; older TRL returns (logps, entropies).
_RETURNS_AUX = "compute_aux_loss" in inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters


def stock_head_dtype(args) -> torch.dtype | None:
    """The dtype TRL 1.16's own LM head takes its inputs in, for completion_hidden(dtype=...): float32 with
    cast_lm_head_to_fp32 (TRL casts the head's weight to float32), else None: the autocast dtype under the
    trainer's autocast (bf16 with its default bf16=True), without autocast the head's own dtype. fastpmd then keeps
    the product's float32 accumulation where TRL rounds each logits tile to bf16 before its float32 softmax: under
    bf16 with cast_lm_head_to_fp32=False the two agree to ~0.2% in grad_norm, not to rounding (docs/API.md)."""
    return torch.float32 if getattr(args, "cast_lm_head_to_fp32", False) else None


class FusedGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with fastpmd's LM-head log-probs; every GRPOConfig loss option works through TRL's own loss."""

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **inputs):
        lm = causal_lm(self.accelerator.unwrap_model(model))
        check_supported(lm, inputs)
        batch_size = batch_size or input_ids.size(0)
        logps, entropies, aux = [], [], []
        for s in range(0, input_ids.size(0), batch_size):  # TRL's memory-bounding row chunks
            with self.accelerator.autocast():
                hidden, weight, bias, a = completion_hidden(lm, input_ids[s:s + batch_size],
                                                            attention_mask[s:s + batch_size], logits_to_keep,
                                                            aux_loss=compute_aux_loss,
                                                            dtype=stock_head_dtype(self.args))
            targets = input_ids[s:s + batch_size, -logits_to_keep:]  # [b, K]
            mask = attention_mask[s:s + batch_size, -logits_to_keep:].bool()  # [b, K]
            out = linear_logprobs(hidden, weight, targets, mask=mask, bias=bias, temperature=self.temperature,
                                  return_entropy=compute_entropy)
            logp, ent = out if compute_entropy else (out, None)
            logps.append(logp)
            entropies.append(ent)
            aux.append(a)
        logp = torch.cat(logps)
        ent = torch.cat(entropies) if compute_entropy else None
        if not _RETURNS_AUX:
            return logp, ent
        return logp, ent, (torch.stack(aux).mean() if compute_aux_loss else None)


PMD_ESTIMATORS = ("mean", "loo", "partition", "partition_loo")


@dataclass
class PMDConfig(GRPOConfig):
    """GRPOConfig for PMDTrainer. tau: PMD temperature; pmd_estimator: mean | loo (PMD-mean), partition |
    partition_loo (PMD-part); length_norm: per-sequence divisor, token count (True), none (False) or a number.
    GRPO-only options (beta, loss_type's clipping, entropy masks and bonuses, vLLM IS correction) are rejected."""

    tau: float = field(default=0.01, metadata={"help": "PMD temperature (regulariser strength)."})
    pmd_estimator: str = field(default="mean", metadata={"help": "mean | loo | partition | partition_loo"})
    length_norm: bool | float = field(default=True, metadata={"help": "token count (True), 1 (False) or a number"})

    def __post_init__(self):
        super().__post_init__()
        if self.pmd_estimator not in PMD_ESTIMATORS:
            raise ValueError(f"pmd_estimator must be one of {PMD_ESTIMATORS}, got {self.pmd_estimator!r}")
        check_tau(self.tau)  # a finite number >= fastpmd.TAU_MIN
        check_length_norm(self.length_norm)
        unsupported = {"beta": self.beta != 0.0, "top_entropy_quantile": self.top_entropy_quantile < 1.0,
                       "entropy_coef": self.entropy_coef != 0.0 or self.use_adaptive_entropy,
                       "off_policy_mask_threshold": self.off_policy_mask_threshold is not None,
                       "vllm_importance_sampling_correction": self.use_vllm
                       and self.vllm_importance_sampling_correction}
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"PMDConfig does not support {bad} (GRPO options; PMD-mean has no KL, clipping or "
                             "entropy terms); set them to their neutral values")


class PMDTrainer(FusedGRPOTrainer):
    """TRL trainer for PMD-mean (pmd_estimator mean/loo) and PMD-part (partition/partition_loo); args: PMDConfig."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, PMDConfig):
            raise ValueError(f"PMDTrainer needs a PMDConfig, got {type(self.args).__name__}")
        self._pmd_adv = None

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)  # [N_all, F]
        rewards = (per_func * self.reward_weights.to(per_func.device).unsqueeze(0)).nansum(dim=1)  # [N_all]
        if torch.isnan(per_func).all(dim=1).any():
            raise ValueError("PMDTrainer: a completion got no reward from any reward function (all None)")
        n = self.num_generations if self.model.training else self.num_generations_eval
        adv = group_advantages(rewards, group_size=n, estimator=self.args.pmd_estimator, tau=self.args.tau)
        rank = self.accelerator.process_index
        self._pmd_adv = adv[rank * len(prompts):(rank + 1) * len(prompts)]  # this process's completions
        return per_func

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        out["advantages"] = self._pmd_adv  # raw-reward group advantages, not TRL's normalised ones
        return out

    def _compute_loss(self, model, inputs):
        completion_ids = inputs["completion_ids"]  # [B, K]
        mask = inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        lm = causal_lm(self.accelerator.unwrap_model(model))
        check_supported(lm, inputs)
        with self.accelerator.autocast():
            hidden, weight, bias, aux = completion_hidden(lm, input_ids, attention_mask, completion_ids.size(1),
                                                          aux_loss=self.aux_loss_enabled,
                                                          dtype=stock_head_dtype(self.args))  # as its old log-probs
        mask = mask.bool()
        old = inputs.get("old_per_token_logps")
        if old is None:  # on-policy micro-batch: pi_t is the current policy (Delta = 0)
            with torch.no_grad():
                old = linear_logprobs(hidden.detach(), weight.detach(), completion_ids, mask=mask,
                                      bias=None if bias is None else bias.detach(), temperature=self.temperature)
        mode = "train" if self.model.training else "eval"
        accum = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        accum = accum if mode == "train" else 1  # TRL's convention: the loss is pre-divided for accumulation
        loss, metrics = fused_linear_pmd_loss(hidden, weight, completion_ids, mask, old, inputs["advantages"],
                                              tau=self.args.tau, length_norm=self.args.length_norm,
                                              temperature=self.temperature, bias=bias,
                                              num_sequences=completion_ids.size(0) * accum)
        if aux is not None:
            loss = loss + self.router_aux_loss_coef * aux / accum
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux.detach()).mean().item())
        self._log_pmd_metrics(mode, metrics)
        return loss

    def _log_pmd_metrics(self, mode: str, metrics: dict) -> None:
        gather = self.accelerator.gather
        stats = torch.stack([metrics["logratio_min"], metrics["logratio_mean"], metrics["logratio_max"],
                             metrics["residual_abs_mean"], metrics["advantage_abs_mean"]]).float()
        g = gather(stats.unsqueeze(0)).view(-1, stats.numel())
        self._metrics[mode]["pmd/logratio_min"].append(g[:, 0].min().item())
        self._metrics[mode]["pmd/logratio_mean"].append(g[:, 1].mean().item())
        self._metrics[mode]["pmd/logratio_max"].append(g[:, 2].max().item())
        self._metrics[mode]["pmd/residual_abs_mean"].append(g[:, 3].mean().item())
        self._metrics[mode]["pmd/advantage_abs_mean"].append(g[:, 4].mean().item())
