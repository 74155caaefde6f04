"""The configured loss on one micro-batch of the trainer: the model's final hidden states and the LM head weight
in, (loss, metrics) out, normalised by the mini-batch's global counts so that the micro-batches' losses add up to
the mini-batch's. What the loss takes comes from its registry entry (fastpmd/registry.py)."""
from __future__ import annotations

import torch

import fastpmd
from fastpmd.objectives import loss_options

from .batch import RolloutBatch


def micro_batch_loss(lo: fastpmd.LossConfig, temperature: float, mb: RolloutBatch, hidden: torch.Tensor,
                     weight: torch.Tensor, n_seq: float, n_items: float, micro_seqs: int):
    """(loss, metrics) of loss `lo` on micro-batch `mb` (old log-probs, advantages [, tau, TIS weights] set):
    hidden [n, H] (the rows of mb.loss_mask, packed) or [b, L, H], LM head weight [V, H]; n_seq, n_items: the mini-batch's sequences and response tokens over
    all ranks / world size; micro_seqs: this micro-batch's sequences."""
    spec = lo.spec
    opts = loss_options(lo, num_sequences=n_seq, num_items=n_items, weights=mb.is_weights,
                        tau=lo.tau if mb.tau is None else mb.tau)  # tau: [b] with tau_schedule="mean-reward"
    head = {"temperature": temperature, "chunk_size": lo.chunk_size, "backend": lo.backend}
    if spec.fused is not None:  # fused: no [N, V] logits, chunked over the LM head
        return spec.fused(hidden, weight, mb.targets, mb.loss_mask, mb.old_logprobs, mb.advantages, **opts, **head)
    logp = fastpmd.linear_logprobs(hidden, weight, mb.targets, mask=mb.loss_mask, **head)
    loss, metrics = spec.fn(logp, mb.old_logprobs, mb.advantages, mb.loss_mask, **opts)
    if spec.normaliser_of(lo) == "batch":
        loss = loss * (micro_seqs / n_seq)  # it averages over the micro-batch: reweight to the mini-batch
    return loss, metrics


def tis_weights(lo: fastpmd.LossConfig, batch: RolloutBatch) -> torch.Tensor | None:
    """The step's rollout-correction weights, once: min(pi_old / pi_rollout, cap) per token [B, L] or per sequence
    [B] as the loss's registry entry takes them; None without loss.rollout_correction."""
    if lo.rollout_correction != "tis":
        return None
    return fastpmd.truncated_is_weights(batch.old_logprobs, batch.rollout_logprobs, batch.loss_mask,
                                        cap=lo.rollout_is_cap, level=lo.spec.weights)
