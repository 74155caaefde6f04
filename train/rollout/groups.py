"""Which ranks share a rollout engine, and which prompts each engine generates (pure functions, no vLLM).

With ``rollout.tensor_parallel_size = TP`` the W trainer ranks form W / TP engine groups of consecutive ranks
(vLLM's own layout under ``distributed_executor_backend="external_launcher"``: its TP groups are
``torch.arange(W).reshape(-1, TP)``, the leading axis being independent engines). Every rank of a group drives one
shard of the same ``vllm.LLM`` and must call ``generate`` with the same prompts and sampling seeds; so a group
generates the prompts of all its ranks (each rank's P / W, concatenated in rank order) and each rank keeps the
responses of its own slice. TP = 1: every rank is its own group (its prompts, its seed), as without vLLM.

    groups = engine_groups(W=8, tp=2)     # [[0, 1], [2, 3], [4, 5], [6, 7]]
    g = EngineGroup(rank=5, world_size=8, tp=2)
    g.index, g.ranks, g.member            # 2, (4, 5), 1

``GroupedEngine`` wraps the engine of a TP > 1 group so that callers keep calling ``generate`` with their own
prompts: it gathers the group's prompts, generates them all with the group leader's sampling options, and hands
each rank its own responses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist

from .base import Response, SamplingConfig

__all__ = ["EngineGroup", "GroupedEngine", "engine_groups", "check_tensor_parallel"]


def check_tensor_parallel(world_size: int, tp: int) -> None:
    """ValueError unless tp >= 1 divides world_size."""
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"rollout.tensor_parallel_size: must be an int >= 1, got {tp!r}")
    if world_size < 1 or world_size % tp:
        raise ValueError(f"rollout.tensor_parallel_size: {tp} does not divide the world size {world_size}")


def engine_groups(world_size: int, tp: int) -> list[list[int]]:
    """The ranks of each engine group, consecutive: group g = [g * tp, (g + 1) * tp)."""
    check_tensor_parallel(world_size, tp)
    return [list(range(g * tp, (g + 1) * tp)) for g in range(world_size // tp)]


@dataclass(frozen=True)
class EngineGroup:
    """Where one rank sits in the engine layout."""

    rank: int
    world_size: int
    tp: int = 1

    def __post_init__(self):
        check_tensor_parallel(self.world_size, self.tp)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")

    @property
    def index(self) -> int:
        """Which engine (0 .. world_size / tp - 1); seeds that must agree within a group derive from it."""
        return self.rank // self.tp

    @property
    def count(self) -> int:
        return self.world_size // self.tp

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(range(self.index * self.tp, (self.index + 1) * self.tp))

    @property
    def member(self) -> int:
        """This rank's position in its group (the slice of the group's prompts it keeps)."""
        return self.rank % self.tp

class GroupedEngine:
    """A rollout engine shared by the ranks of one engine group (every rank of the group calls each method).

    ``generate(own_prompts, sampling)`` all-gathers the group's prompt lists (``all_gather_object`` on
    ``process_group``; ranks may bring different counts), runs the engine on their concatenation in rank order
    with the leader's (member 0's) sampling, so all shards see the same request and seeds, and returns this
    rank's part, log-probs included. The other methods go to the engine unchanged.
    """

    def __init__(self, engine, group: EngineGroup, process_group):
        self.engine, self.group, self.process_group = engine, group, process_group

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[list[Response]]:
        mine = [[int(t) for t in p] for p in prompt_ids]
        gathered: list = [None] * self.group.tp
        dist.all_gather_object(gathered, (mine, sampling), group=self.process_group)
        counts = [len(g[0]) for g in gathered]
        start = sum(counts[: self.group.member])
        out = self.engine.generate([p for g in gathered for p in g[0]], gathered[0][1])
        return list(out)[start:start + counts[self.group.member]]  # Responses keep their log-probs

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.engine.update_weights(named_tensors)

    def sleep(self) -> None:
        self.engine.sleep()

    def wake(self) -> None:
        self.engine.wake()

    def close(self) -> None:
        getattr(self.engine, "close", lambda: None)()
