"""The step's data, typed: `RolloutBatch`, the packed generation batch (`packing.pack_batch` builds it), and the
fields the step adds to it in order (rollout log-probs, advantages, tau, old log-probs, TIS weights)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class RolloutBatch:
    """B right-padded sequences prompt_i + response_i of L positions; targets[b, t] = input_ids[b, t+1] and
    loss_mask[b, t] is True where targets[b, t] is a response token (packing.pack_batch). Per-token fields are
    [B, L], per-sequence fields [B]; the step's fields are None until it sets them."""

    input_ids: torch.Tensor  # [B, L] int64, pad_id past each sequence
    attention_mask: torch.Tensor  # [B, L] int64, 1 on real tokens
    position_ids: torch.Tensor  # [B, L] int64, 0..len-1 per sequence, 0 on padding
    targets: torch.Tensor  # [B, L] int64, the next token (pad_id in the last column)
    loss_mask: torch.Tensor  # [B, L] bool, targets that are response tokens
    prompt_lengths: torch.Tensor  # [B] int64
    response_lengths: torch.Tensor  # [B] int64
    rollout_logprobs: torch.Tensor | None = None  # [B, L] fp32, the engine's log-probs of its samples (0 off mask)
    advantages: torch.Tensor | None = None  # [B], the loss's estimator over each prompt's group
    tau: torch.Tensor | None = None  # [B] fp32, per-prompt loss tau (loss.tau_schedule="mean-reward")
    old_logprobs: torch.Tensor | None = None  # [B, L] fp32, pi_t at the sampling temperature (0 off mask)
    is_weights: torch.Tensor | None = None  # [B] ("sequence") or [B, L] ("token"): TIS weights of the loss

    def fields(self) -> dict[str, torch.Tensor]:
        """The fields that are set, by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def to(self, device: torch.device) -> RolloutBatch:
        return RolloutBatch(**{k: v.to(device, non_blocking=True) for k, v in self.fields().items()})

    def rows(self, idx: torch.Tensor) -> RolloutBatch:
        """Rows idx [b], trimmed to their longest sequence (what a micro-batch holds)."""
        out = {k: v[idx] for k, v in self.fields().items()}
        L = int((out["prompt_lengths"] + out["response_lengths"]).max())
        return RolloutBatch(**{k: (v[:, :L] if v.dim() == 2 else v) for k, v in out.items()})

    def lengths(self, idx: torch.Tensor) -> list[int]:
        """Prompt + response tokens of the sequences idx (what a packed micro-batch holds)."""
        return self.attention_mask[idx].sum(1).tolist()
