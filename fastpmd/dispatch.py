"""Dispatch of the LM-head ops: backend resolution, row compaction (masked tokens cost nothing) and scattering
back, and the per-backend call on compacted rows. `linear_logprobs` and `fused_linear_pmd_loss` both go through
here; plain-PyTorch equivalents: `hidden[mask]` (compact_rows) and `out.new_zeros(shape).index_put_(mask, values)`
(scatter_rows)."""
from __future__ import annotations

import torch

from ._checks import check_backend
from .chunked import ChunkedLinearLogprobs, default_chunk_rows
from .naive import naive_linear_logprobs


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA when the kernels import, else 'torch'. 'triton' elsewhere raises clearly."""
    check_backend(backend)
    if backend == "auto":
        if device.type == "cuda" and _triton_available(device):
            return "triton"
        return "torch"
    if backend == "triton" and not _triton_available(device):
        raise ValueError(
            "backend='triton' needs CUDA tensors and an importable triton (or TRITON_INTERPRET=1 for the CPU "
            f"interpreter); got device {device}. Use backend='torch' or 'auto'."
        )
    return backend


def _triton_available(device: torch.device) -> bool:
    try:
        from fastpmd.kernels import is_available
    except ImportError:
        return False
    return bool(is_available(device))


def compact_rows(hidden: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None):
    """Flatten to rows and keep the valid ones. Returns (h [n, H], t [n] int64, idx [n] or None). hidden may
    already be packed: [n, H], the rows of mask's True entries in row-major order (targets, mask [B, T])."""
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t2 = targets.reshape(-1)
    if mask is None:
        return h2, t2.long(), None
    idx = mask.reshape(-1).nonzero().squeeze(1)  # one host sync (the row count)
    if hidden.dim() == 2 and targets.dim() == 2:  # packed rows
        if idx.numel() != hidden.shape[0]:
            raise ValueError(f"hidden has {hidden.shape[0]} packed rows but mask selects {idx.numel()}")
        return hidden, t2.index_select(0, idx).long(), idx
    return h2.index_select(0, idx), t2.index_select(0, idx).long(), idx


def scatter_rows(values: torch.Tensor, idx: torch.Tensor | None, shape) -> torch.Tensor:
    """Inverse of compact_rows for per-token values [n] -> shape, zeros where masked (differentiable)."""
    if idx is None:
        return values.reshape(shape)
    out = values.new_zeros(int(torch.Size(shape).numel()))
    return out.index_put((idx,), values).reshape(shape)


def rows_logprobs(h, weight, t, bias, temperature: float, return_entropy: bool, chunk_size, backend: str):
    """Dispatch on compacted rows: h [n, H], t [n] -> (logp [n], entropy [n] or None)."""
    if backend == "naive" or h.shape[0] == 0:  # no rows (empty or fully masked): nothing for a kernel to do
        return naive_linear_logprobs(h, weight, t, bias, temperature, return_entropy)
    if backend == "triton":
        from fastpmd.kernels import linear_logprobs_triton

        return linear_logprobs_triton(h, weight, t, bias, temperature, return_entropy)
    chunk = chunk_size or default_chunk_rows(weight.shape[0])
    logp, ent = ChunkedLinearLogprobs.apply(h, weight, bias, t, 1.0 / temperature, return_entropy, int(chunk))
    return logp, (ent if return_entropy else None)
