"""Packing in one place: (prompt, response) token ids -> right-padded training tensors (`pack_batch`), and the
packed-row layout of those tensors for attention (`pack_layout`: whole sequences in rows of bounded length)."""
from __future__ import annotations

from typing import Sequence

import torch

from .batch import RolloutBatch


def pack_batch(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
               pad_id: int) -> RolloutBatch:
    """Right-padded training tensors for sequences ``prompt_i + response_i`` (B of them, L = longest).

    Shift convention: the hidden state at position t predicts token t+1, so ``targets[b, t] = input_ids[b, t+1]``
    (``pad_id`` in the last column) and ``loss_mask[b, t]`` is True exactly when token t+1 is a response token,
    i.e. for t in ``[len(prompt_b) - 1, len(prompt_b) + len(response_b) - 2]``. Per-token log-probs computed on
    ``(hidden[:, t], targets[:, t])`` and masked with ``loss_mask`` are the response log-probs, in order.

    Returns a RolloutBatch (train/batch.py) of int64 ``input_ids``, ``attention_mask`` (1 on real tokens),
    ``position_ids`` (0..len-1 per sequence, 0 on padding), ``targets`` — all ``[B, L]`` — bool ``loss_mask`` ``[B, L]``, and int64 ``prompt_lengths``,
    ``response_lengths`` ``[B]``.
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"prompt_ids and response_ids must have the same length, got "
                         f"{len(prompt_ids)} and {len(response_ids)}")
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids must not be empty")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("prompt_ids: every prompt needs at least one token (it predicts the first response token)")
    B = len(prompt_ids)
    plen = torch.tensor([len(p) for p in prompt_ids], dtype=torch.long)  # [B]
    rlen = torch.tensor([len(r) for r in response_ids], dtype=torch.long)  # [B]
    input_ids = torch.full((B, int((plen + rlen).max())), pad_id, dtype=torch.long)  # [B, L]
    for b, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        seq = list(p) + list(r)
        input_ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return RolloutBatch(input_ids=input_ids, **derived_fields(input_ids, plen, rlen, pad_id))


DERIVED = ("attention_mask", "position_ids", "targets", "loss_mask", "prompt_lengths", "response_lengths")


def derived_fields(input_ids: torch.Tensor, plen: torch.Tensor, rlen: torch.Tensor,
                   pad_id: int) -> dict[str, torch.Tensor]:
    """Everything `pack_batch` returns besides input_ids [B, L] (right-padded with pad_id), from it and the
    prompt/response lengths plen, rlen [B]."""
    B, L = input_ids.shape
    pos = torch.arange(L).expand(B, L)  # [B, L]
    attention_mask = (pos < (plen + rlen)[:, None]).long()  # [B, L]
    position_ids = pos * attention_mask  # [B, L]
    targets = torch.full_like(input_ids, pad_id)  # [B, L]
    targets[:, :-1] = input_ids[:, 1:]
    loss_mask = (pos >= (plen - 1)[:, None]) & (pos < (plen + rlen - 1)[:, None])  # [B, L]
    return {
        "attention_mask": attention_mask,
        "position_ids": position_ids.contiguous(),
        "targets": targets,
        "loss_mask": loss_mask,
        "prompt_lengths": plen,
        "response_lengths": rlen,
    }

def pack_layout(valid: torch.Tensor, row_tokens: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Where each real token of a right-padded batch goes in a packed [R, C] grid (one host sync).

    valid: [B, L] bool, each row a prefix of True. Sequences are placed in order, whole, into rows of capacity
    C = max(row_tokens, longest sequence); row_tokens None puts everything into one row (C = total tokens).
    Returns dest [N] (flat indices into the [R * C] grid, in the row-major order of valid's True entries),
    used [R] (real tokens per row; the rest of a row is free) and C.
    """
    lengths = valid.sum(1).tolist()
    C = max(sum(lengths) if row_tokens is None else max(row_tokens, max(lengths, default=0)), 1)
    starts, used = [], [0]
    for n in lengths:
        if used[-1] + n > C:
            used.append(0)
        starts.append((len(used) - 1) * C + used[-1])
        used[-1] += n
    first = torch.tensor(starts, dtype=torch.long, device=valid.device)  # [B]
    dest = (first[:, None] + torch.arange(valid.shape[1], device=valid.device))[valid]  # [N]
    return dest, torch.tensor(used, dtype=torch.long, device=valid.device), C
