"""Token-budget micro-batches (`optim.micro_batch_tokens`), the same number on every rank.

Plan for one rank's sequences with token counts `lengths` (prompt + response, the tokens a micro-batch packs):
    M_local = bins of first-fit decreasing with capacity `budget` (a sequence longer than the budget alone)
    M = max over ranks of M_local                    # one all-reduce: every rank runs M forward/backwards
    longest first, each sequence into the least-loaded of M bins (LPT): equal work per micro-batch, so the
    ranks' micro-batches, each about (rank's tokens / M), finish close together; if that breaks the budget,
    the first-fit-decreasing bins plus empty ones (an empty micro-batch runs with zero weight).
This plans one rank's sequences; which rank holds which sequence is train/rank_balance.py's business (it runs
first). The loss normalisers are global, so the accumulated gradient equals the one-big-batch gradient whatever
the plan.
"""
from __future__ import annotations

from typing import Sequence


def first_fit_decreasing(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Bins of indices with at most `budget` tokens each (a longer sequence gets a bin of its own)."""
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for b, load in enumerate(loads):
            if load + lengths[i] <= budget:
                bins[b].append(i)
                loads[b] += lengths[i]
                break
        else:
            bins.append([i])
            loads.append(lengths[i])
    return [sorted(b) for b in bins]


def pack_micro_batches(lengths: Sequence[int], budget: int, num_bins: int | None = None) -> list[list[int]]:
    """Indices of `lengths` in micro-batches of at most `budget` tokens (or one over-long sequence).

    num_bins None: as few as first-fit decreasing finds. num_bins >= that count: exactly num_bins micro-batches
    with balanced token counts (some may be empty when the balanced split would break the budget).
    """
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    ffd = first_fit_decreasing(lengths, budget)
    if num_bins is None:
        return ffd
    if num_bins < len(ffd):
        raise ValueError(f"num_bins: {num_bins} micro-batches cannot hold these sequences (need {len(ffd)})")
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    loads = [0] * num_bins
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        b = min(range(num_bins), key=lambda k: (loads[k], k))
        bins[b].append(i)
        loads[b] += lengths[i]
    if all(load <= budget or len(b) == 1 for b, load in zip(bins, loads)):
        return [sorted(b) for b in bins]
    return ffd + [[] for _ in range(num_bins - len(ffd))]
