"""Sequences moved between ranks so that every rank trains about the same number of tokens in each mini-batch
(`optim.micro_batch_tokens` > 0 and `optim.balance_ranks`, more than one rank).

Plan, computed identically on every rank from all-gathered lengths (one all-gather, one host sync per step):
    sequences in global order (rank 0's B rows, then rank 1's, ...), each with its mini-batch id
    for each mini-batch j, longest first (ties: global index):
        owner = the rank holding the fewest tokens of mini-batch j so far (ties: the sequence's own rank, then the
                lowest rank)                  # LPT: a rank's load <= the mean load + the longest sequence
Exchange (`exchange`): one `all_to_all_single` per other field of the batch (ids, advantages, tau, engine
log-probs); per-token fields send only each row's real tokens (flattened), rebuilt right-padded on arrival; the
lengths and mini-batch ids come from the gather, and masks, positions and targets are re-derived from them and the
ids (`train/packing.py`). Rows arrive ordered by source rank, then source row: deterministic, so a resumed
run is bit-identical. Traffic: the moved sequences' tokens x (8 B per id + 4 B per float field), never activations.

Why the gradient does not change: rewards, advantages and tau were computed where the whole group was and travel
with the rows; every loss is a sum over sequences or tokens divided by global counts, so which rank trains a
sequence only changes the order of a sum.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from .batch import RolloutBatch
from .packing import DERIVED, derived_fields


def plan_owners(lengths: Sequence[int], minibatch: Sequence[int], world: int) -> list[int]:
    """The rank that trains each sequence. lengths, minibatch: per sequence in global order (rank r's rows are
    r*B .. (r+1)*B - 1, B = len(lengths) // world); per mini-batch, longest first onto the least-loaded rank."""
    if len(lengths) != len(minibatch) or len(lengths) % world:
        raise ValueError(f"lengths ({len(lengths)}) and minibatch ({len(minibatch)}) must hold the same number of "
                         f"sequences, a multiple of world={world}")
    B = len(lengths) // world
    owners = [0] * len(lengths)
    loads: dict[int, list[int]] = {}
    for i in sorted(range(len(lengths)), key=lambda j: (minibatch[j], -lengths[j], j)):
        load = loads.setdefault(minibatch[i], [0] * world)
        src = i // B
        r = min(range(world), key=lambda k: (load[k], k != src, k))
        owners[i] = r
        load[r] += lengths[i]
    return owners


def exchange(batch: RolloutBatch, minibatch: torch.Tensor, pad_id: int,
             device: torch.device) -> tuple[RolloutBatch, torch.Tensor, list[int]]:
    """Rows of the packed generation batch (`pack_batch` fields + per-sequence [B] and per-token [B, L] fields, on
    the host) moved to the ranks `plan_owners` picks. minibatch: [B] mini-batch id of each row (whole prompt
    groups). Returns (this rank's new batch, its rows' mini-batch ids [B'], tokens per rank after the move)."""
    W, rank = dist.get_world_size(), dist.get_rank()
    B = minibatch.numel()
    plen, rlen = batch.prompt_lengths, batch.response_lengths
    local = torch.stack([plen, rlen, minibatch.long()]).to(device)  # [3, B]
    parts = [torch.empty_like(local) for _ in range(W)]
    dist.all_gather(parts, local)  # the same B on every rank (the mini-batches are whole prompt groups)
    g = torch.stack(parts).cpu()  # [W, 3, B]: the step's one host sync here
    lengths = (g[:, 0] + g[:, 1]).reshape(-1)  # [W * B]
    owners = torch.tensor(plan_owners(lengths.tolist(), g[:, 2].reshape(-1).tolist(), W)).view(W, B)
    dest = owners[rank]  # [B]
    order = torch.argsort(dest, stable=True)  # rows grouped by destination, each group in row order
    to_me = owners == rank  # [W, B]: rows arriving here, by source rank then row
    rows_out = torch.bincount(dest, minlength=W).tolist()
    rows_in = to_me.sum(1).tolist()
    tok_out = torch.bincount(dest, weights=lengths.view(W, B)[rank].double(), minlength=W).long().tolist()
    tok_in = (lengths.view(W, B) * to_me).sum(1).tolist()

    def move(t: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
        """t's leading rows in send[r]-sized pieces to each rank r; recv[r] rows from each rank r."""
        out = torch.empty((sum(recv), *t.shape[1:]), dtype=t.dtype, device=device)
        dist.all_to_all_single(out, t.to(device).contiguous(), recv, send)
        return out.cpu()

    new_plen, new_rlen, new_mb = g[:, 0][to_me], g[:, 1][to_me], g[:, 2][to_me]  # known from the gather
    new_len = new_plen + new_rlen
    valid_in = batch.attention_mask[order].bool()  # [B, L]
    L = int(new_len.max())
    valid_out = torch.arange(L)[None, :] < new_len[:, None]  # [B', L]
    out: dict[str, torch.Tensor] = {}
    for key, t in batch.fields().items():
        if key in DERIVED:
            continue
        if t.dim() == 1:
            out[key] = move(t[order], rows_out, rows_in)
        else:  # per token: only the real tokens travel
            flat = move(t[order][valid_in], tok_out, tok_in)
            full = torch.full((len(new_len), L), pad_id if key == "input_ids" else 0, dtype=t.dtype)
            full[valid_out] = flat
            out[key] = full
    out = RolloutBatch(**out, **derived_fields(out["input_ids"], new_plen, new_rlen, pad_id))
    rank_tokens = torch.bincount(owners.reshape(-1), weights=lengths.double(), minlength=W).long().tolist()
    return out, new_mb, rank_tokens


def balance(batch: RolloutBatch, minibatches: list[torch.Tensor], pad_id: int,
            device: torch.device) -> tuple[RolloutBatch, list[torch.Tensor]]:
    """`exchange` for the trainer: minibatches, the row indices of each mini-batch of this rank's batch, in, this
    rank's new batch and the row indices of each mini-batch in it (the same count of mini-batches) out."""
    ids = torch.empty(batch.input_ids.shape[0], dtype=torch.long)  # [B] mini-batch of each row
    for j, idx in enumerate(minibatches):
        ids[idx] = j
    batch, ids, _ = exchange(batch, ids, pad_id, device)
    return batch, [torch.nonzero(ids == j).flatten() for j in range(len(minibatches))]
