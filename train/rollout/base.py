"""The rollout-engine interface: sample n responses per prompt from token ids, take new weights from the trainer.

``RolloutEngine`` is what the trainer uses; ``fastpmd.train.rollout.hf.HFEngine`` (Hugging Face
``model.generate``) is the embedded default, ``fastpmd.train.rollout.vllm.VLLMEngine`` the fast one (optional
extra ``fastpmd[vllm]``). Engines are found by name in ``fastpmd.train.rollout.ENGINES``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol, runtime_checkable

import torch

__all__ = ["SamplingConfig", "Response", "RolloutEngine", "check_prompts", "trim_response", "logprobs_on_grid"]


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling options. ``temperature == 0`` means greedy. ``seed`` None: unseeded (not reproducible);
    engines given the same seed and inputs return the same samples, so a trainer varies it per step."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = None

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


class Response(list):
    """One sampled response: its token ids (a plain ``list`` of int, so it is used like one) plus ``logprobs``,
    a list of floats aligned with the tokens: the log-probability of each sampled token under the distribution
    the engine sampled it from, i.e. the model's logits divided by the temperature, then top-p filtered and
    renormalised (vLLM's ``logprobs_mode="processed_logprobs"``); greedy (temperature 0): the plain
    log-softmax. At top_p = 1 this is the trainer's log-prob at the sampling temperature; at top_p < 1 it is
    larger by -log(kept mass) of each step's nucleus. ``logprobs`` is None when the engine did not record them."""

    def __init__(self, token_ids=(), logprobs=None):
        super().__init__(token_ids)
        self.logprobs = None if logprobs is None else list(logprobs)
        if self.logprobs is not None and len(self.logprobs) != len(self):
            raise ValueError(f"logprobs: {len(self.logprobs)} values for {len(self)} tokens")


def logprobs_on_grid(responses: list, loss_mask: torch.Tensor) -> torch.Tensor | None:
    """The responses' engine log-probs on a packed batch's [B, L] grid (0 off loss_mask), or None when any
    response has none. loss_mask [B, L]'s True entries, row by row, are the response tokens in order
    (`packing.pack_batch`)."""
    lps = [getattr(r, "logprobs", None) for r in responses]
    if any(lp is None for lp in lps):
        return None
    out = torch.zeros(loss_mask.shape, dtype=torch.float32)  # [B, L]
    out[loss_mask] = torch.tensor([x for lp in lps for x in lp], dtype=torch.float32)
    return out


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from a generator.

    ``generate`` returns, per prompt, ``sampling.n`` responses (``Response``: token-id lists with ``logprobs``); a
    response that produced eos ends with it (eos included), else it has ``max_new_tokens`` tokens.
    ``update_weights`` takes (name, full tensor) pairs named as in the Hugging Face model's ``state_dict``. ``sleep``/``wake`` free and restore the engine's
    accelerator memory around the training phase (no-ops where there is nothing to free).
    """

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[list[list[int]]]: ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def sleep(self) -> None: ...

    def wake(self) -> None: ...


def trim_response(ids: list[int], eos_id: int, max_new_tokens: int) -> list[int]:
    """Cut ``ids`` after the first eos (kept) and at ``max_new_tokens``."""
    ids = ids[:max_new_tokens]
    try:
        return ids[: ids.index(eos_id) + 1]
    except ValueError:
        return ids


def check_prompts(prompt_ids: list[list[int]]) -> None:
    if not isinstance(prompt_ids, (list, tuple)):
        raise ValueError(f"prompt_ids must be a list of token-id lists, got {type(prompt_ids).__name__}")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("prompt_ids: every prompt needs at least one token")
