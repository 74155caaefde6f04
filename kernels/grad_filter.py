"""Gradient filtering (opt-in, after Cut Cross-Entropy's): the backward drops (token x vocab) blocks whose logit
gradients are negligible and its gradient GEMMs skip them.

Rule, per block I x J of BLOCK_N tokens x BLOCK_V vocab columns of the dlogits kernel (kernels/dlogits.py,
FILTER branch; `reference_filter` below is the same rule in plain PyTorch, the test oracle):
    u[i]      = (|g_logp[i]| + |g_ent[i]|) / T                   # the upstream gradient scale of token i
    keep[I,J] = any over i in I, j in J of |dz[i, j]| > eps * u[i]
    dz[I, J]  = 0 where not keep[I, J]; grad_h, grad_W, grad_b are then computed from this dz
With only a log-prob gradient, |dz[i, j]| / u[i] = |onehot - p|: a block is dropped when all its p are <= eps
(and no target in it has p >= 1 - eps). The Triton matmul skips the K-steps of dropped blocks (flags
[token tiles, vocab tiles] int8); on cuBLAS the zeros are multiplied (same numbers, no saving).

Off by default. FASTPMD_GRAD_FILTER, read at each backward: unset / 0 / off = off; 1 / on = eps 2**-12 (the
default, for bf16, whose own rounding is 2**-9 relative); a number = that eps. Its error and the fraction of
blocks it drops on realistic distributions are measured by `python -m fastpmd.bench.filtering`
(docs/kernels.md, "Gradient filtering").
"""
from __future__ import annotations

import os

import torch

ENV_GRAD_FILTER = "FASTPMD_GRAD_FILTER"
DEFAULT_EPS = 2.0**-12


def filter_eps() -> float | None:
    """eps from FASTPMD_GRAD_FILTER, or None when filtering is off."""
    raw = os.environ.get(ENV_GRAD_FILTER, "").strip().lower()
    if raw in ("", "0", "off", "false", "no"):
        return None
    if raw in ("1", "on", "true", "yes"):
        return DEFAULT_EPS
    try:
        eps = float(raw)
    except ValueError:
        eps = -1.0
    if not 0 < eps < 1:
        raise ValueError(f"{ENV_GRAD_FILTER} must be off, on or an eps in (0, 1), got {raw!r}")
    return eps


def reference_filter(dz: torch.Tensor, g_logp: torch.Tensor, g_ent: torch.Tensor | None, temperature: float,
                     eps: float, block_n: int, block_v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The filtering rule on a dense dz [n, V] (any float dtype; compared in its precision).

    Returns (dz with dropped blocks zeroed [n, V], keep [ceil(n / block_n), ceil(V / block_v)] bool)."""
    n, V = dz.shape
    u = g_logp.abs().to(dz.dtype)
    if g_ent is not None:
        u = u + g_ent.abs().to(dz.dtype)
    big = dz.abs() > (eps / temperature) * u[:, None]                      # [n, V]
    nt, nv = -(-n // block_n), -(-V // block_v)
    padded = big.new_zeros(nt * block_n, nv * block_v)
    padded[:n, :V] = big
    keep = padded.view(nt, block_n, nv, block_v).any(3).any(1)           # [nt, nv]
    mask = keep.repeat_interleave(block_n, 0).repeat_interleave(block_v, 1)[:n, :V]
    return dz * mask, keep
