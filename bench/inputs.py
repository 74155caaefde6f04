"""The inputs every method gets for one shape: hidden states, LM-head weight, targets, mask, old log-probs,
rewards. Built once from a seed so every method (and every fresh memory process) sees the same numbers."""
from __future__ import annotations

import dataclasses

import torch

from .presets import Shape


@dataclasses.dataclass
class Inputs:
    """hidden [B,T,H] and weight [V,H] are leaves that require grad; the rest are data.

    `old_logprobs` are the log-probs of the same head slightly perturbed (ratios near 1, as after a few
    optimizer steps); `rewards` are +-1 per sequence, in groups of `shape.group_size`.
    """

    shape: Shape
    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    old_logprobs: torch.Tensor
    rewards: torch.Tensor

    @property
    def tokens(self) -> int:
        """Trained tokens n (mask count): what ms/token divides by and the matrix-product floor uses."""
        return int(self.mask.sum())

    def zero_grad(self) -> None:
        """Drop the gradients so the next step allocates them again (as a training step does)."""
        self.hidden.grad = None
        self.weight.grad = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.hidden, self.weight, self.targets, self.mask,
                                                             self.old_logprobs, self.rewards))

    def grad_bytes(self) -> int:
        """Size of grad_hidden plus grad_weight in the inputs' dtypes."""
        return (self.hidden.numel() * self.hidden.element_size()
                + self.weight.numel() * self.weight.element_size())


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def make_mask(shape: Shape, generator: torch.Generator) -> torch.Tensor:
    """[B,T] bool: all True for mask="full"; response lengths in [T/4, T] with right padding for "ragged"."""
    b, t = shape.batch, shape.seq_len
    if shape.mask == "full":
        return torch.ones(b, t, dtype=torch.bool)
    lengths = torch.randint(max(1, t // 4), t + 1, (b,), generator=generator)
    return torch.arange(t)[None, :] < lengths[:, None]


@torch.no_grad()
def _chunked_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      rows: int = 1024) -> torch.Tensor:
    """Plain log-softmax gather, chunked over rows so big vocabularies never hold all logits."""
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    out = torch.empty(flat_t.shape, dtype=torch.float32, device=hidden.device)
    for s in range(0, flat_h.shape[0], rows):
        logits = (flat_h[s:s + rows] @ weight.T).float()
        out[s:s + rows] = torch.log_softmax(logits, -1).gather(-1, flat_t[s:s + rows, None])[:, 0]
    return out.view(targets.shape)


def make_inputs(shape: Shape, device: str | torch.device = "cpu", seed: int = 0) -> Inputs:
    """Deterministic inputs for `shape` on `device` (built on the CPU generator, then moved)."""
    g = torch.Generator().manual_seed(seed)
    b, t, h, v = shape.batch, shape.seq_len, shape.hidden, shape.vocab
    dtype = _dtype(shape.dtype)
    hidden = torch.randn(b, t, h, generator=g)
    weight = torch.randn(v, h, generator=g) * (2.0 / h ** 0.5)  # logits with a spread of about 2
    targets = torch.randint(0, v, (b, t), generator=g)
    mask = make_mask(shape, g)
    rewards = (torch.randint(0, 2, (b,), generator=g) * 2 - 1).float()
    noise = 0.02 * torch.randn(b, t, generator=g)
    hidden, weight = hidden.to(device=device, dtype=dtype), weight.to(device=device, dtype=dtype)
    targets, mask = targets.to(device), mask.to(device)
    old = (_chunked_logprobs(hidden, weight, targets) + noise.to(device)) * mask
    return Inputs(shape, hidden.requires_grad_(True), weight.requires_grad_(True), targets, mask,
                  old.contiguous(), rewards.to(device))
