"""The configured loss on one micro-batch of the trainer: the model's final hidden states and the LM head weight
in, (loss, metrics) out, normalised by the mini-batch's global counts so that the micro-batches' losses add up to
the mini-batch's."""
from __future__ import annotations

import dataclasses

import torch

import fastpmd


def micro_batch_loss(lo: fastpmd.LossConfig, temperature: float, mb: dict, hidden: torch.Tensor,
                     weight: torch.Tensor, n_seq: float, n_items: float, micro_seqs: int):
    """(loss, metrics) of loss `lo` on micro-batch `mb` (packed fields, old log-probs, advantages [, tau,
    rollout log-probs]): hidden [n, H] (the rows of mb["loss_mask"], packed) or [b, L, H], LM head weight
    [V, H]; n_seq, n_items: the mini-batch's sequences and
    response tokens over all ranks / world size; micro_seqs: this micro-batch's sequences."""
    T = temperature
    tgt, mask, old, adv = mb["targets"], mb["loss_mask"], mb["old_logprobs"], mb["advantages"]
    weights = None  # rollout correction: [B] for the PMD losses, [B, L] for grpo/gspo
    if lo.rollout_correction == "tis":
        weights = fastpmd.truncated_is_weights(old, mb["rollout_logprobs"], mask, cap=lo.rollout_is_cap,
                                               level="sequence" if lo.is_pmd else "token")
    tau = mb.get("tau", lo.tau)  # [b] with tau_schedule="mean-reward"
    if lo.is_pmd:  # fused: no [N, V] logits, chunked over the LM head
        return fastpmd.fused_linear_pmd_loss(hidden, weight, tgt, mask, old, adv, tau=tau,
                                             length_norm=lo.length_norm, temperature=T, chunk_size=lo.chunk_size,
                                             num_sequences=n_seq, backend=lo.backend, weights=weights)
    logp = fastpmd.linear_logprobs(hidden, weight, tgt, mask=mask, temperature=T, chunk_size=lo.chunk_size,
                                   backend=lo.backend)
    cfg = dataclasses.replace(lo, loss_type="dapo") if lo.loss_type == "bnpo" else lo
    loss, metrics = fastpmd.compute_loss(cfg, logp, old, adv, mask, num_sequences=n_seq, num_items=n_items,
                                         weights=weights)
    if lo.name in ("grpo", "gspo") and lo.loss_type in ("grpo", "dr_grpo"):
        loss = loss * (micro_seqs / n_seq)  # these average over the micro-batch: reweight to the mini-batch
    return loss, metrics
