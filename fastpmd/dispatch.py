"""Dispatch of the LM-head ops: backend resolution, row compaction (masked tokens cost nothing) and scattering
back, and the per-backend call on compacted rows. `linear_logprobs` and `fused_linear_pmd_loss` both go through
here; plain-PyTorch equivalents: `hidden[mask]` (compact_rows) and `out.new_zeros(shape).index_put_(mask, values)`
(scatter_rows)."""
from __future__ import annotations

import torch

from ._checks import check_backend
from .chunked import ChunkedLinearLogprobs, default_chunk_rows
from .naive import naive_linear_logprobs


def resolve_backend(backend: str, device: torch.device, head: tuple | None = None) -> str:
    """'auto' -> 'torch' off CUDA (or without the kernels) and while torch.compile traces; on CUDA the backend
    predicted faster by the cost model (fastpmd.cost_model; measured once per shape with FASTPMD_AUTOTUNE=1:
    fastpmd.auto_backend) for head = (op "pmd" | "logprobs", rows, H, V, dtype, padded sequence length or
    None), 'triton' without head. 'triton' or 'cublas' (its row kernel is Triton) where it cannot run raises
    clearly."""
    check_backend(backend)
    if backend == "auto":
        if device.type == "cuda" and _triton_available(device):
            if torch.compiler.is_compiling():
                return "torch"  # the backend traced (and tested) under torch.compile
            if head is None:
                return "triton"
            from .auto_backend import cuda_choice
            op, n, H, V, dtype, seq_len = head
            return cuda_choice(op, device, n, H, V, dtype, seq_len, allow_measure=not sync_free())
        return "torch"
    if backend in ("triton", "cublas") and not _triton_available(device):
        raise ValueError(
            f"backend={backend!r} needs CUDA tensors and an importable triton (or TRITON_INTERPRET=1 for the CPU "
            f"interpreter); got device {device}. Use backend='torch' or 'auto'."
        )
    return backend


def torch_chunk_rows(chunk_size: int | None, vocab: int, device: torch.device) -> int:
    """Rows per chunk of the torch backend: chunk_size, else a 64 MiB fp32 logits block (512 MiB on CUDA,
    cost_model.GPU_CHUNK_BYTES: GEMMs big enough for cuBLAS, and whole sequences fit for the single pass)."""
    if chunk_size:
        return int(chunk_size)
    if device.type == "cuda":
        from .cost_model import GPU_CHUNK_BYTES
        return default_chunk_rows(vocab, GPU_CHUNK_BYTES)
    return default_chunk_rows(vocab)


def _triton_available(device: torch.device) -> bool:
    try:
        from fastpmd.kernels import is_available
    except ImportError:
        return False
    return bool(is_available(device))


def _is_dtensor(t) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def plain_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """A DTensor weight/bias (tensor-parallel LM head, an FSDP2 parameter) -> its full tensor, gathered with
    autograd (`weight.full_tensor()`: the gradient flows back to the DTensor in its own placements). A DTensor
    hidden is refused: which rows are local is the caller's decision. Never lets a DTensor reach a kernel (its
    data_ptr() is 0). Returns (weight, bias) as plain tensors."""
    if _is_dtensor(hidden):
        raise ValueError("hidden is a DTensor: pass a plain tensor (hidden.full_tensor(), or hidden.to_local() "
                         "with the matching local targets)")
    weight = weight.full_tensor() if _is_dtensor(weight) else weight
    bias = bias.full_tensor() if _is_dtensor(bias) else bias
    return weight, bias


def sync_free() -> bool:
    """True while torch.compile traces or a CUDA graph is being captured: no data-dependent host sync then (no
    row compaction, no host-side value checks, no host-side sequence boundaries)."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def compact_rows(hidden: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None):
    """Flatten to rows and keep the valid ones. Returns (h [n, H], t [n] int64, keep): keep = None (no mask),
    the kept row indices [n] (eager), or, under sync_free(), the flat bool mask [N] with every row kept and the
    masked targets replaced by 0 (no host sync; masked rows cost matrix work and are zeroed by scatter_rows).
    hidden may already be packed: [n, H], the rows of mask's True entries in row-major order (targets, mask
    [B, T]); its indices then come from nonzero_static with n known (no host sync under sync_free())."""
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t2 = targets.reshape(-1)
    if mask is None:
        return h2, t2.long(), None
    if hidden.dim() == 2 and targets.dim() == 2:  # packed rows
        if sync_free():
            idx = torch.nonzero_static(mask.reshape(-1), size=hidden.shape[0]).squeeze(1)
        else:
            idx = mask.reshape(-1).nonzero().squeeze(1)  # one host sync (the row count)
            if idx.numel() != hidden.shape[0]:
                raise ValueError(f"hidden has {hidden.shape[0]} packed rows but mask selects {idx.numel()}")
        return hidden, t2.index_select(0, idx).long(), idx
    if sync_free():
        m = mask.reshape(-1)
        return h2, torch.where(m, t2, 0).long(), m
    idx = mask.reshape(-1).nonzero().squeeze(1)  # one host sync (the row count)
    return h2.index_select(0, idx), t2.index_select(0, idx).long(), idx


def scatter_rows(values: torch.Tensor, keep: torch.Tensor | None, shape) -> torch.Tensor:
    """Inverse of compact_rows for per-token values [n] -> shape, zeros where masked (differentiable)."""
    if keep is None:
        return values.reshape(shape)
    if keep.dtype == torch.bool:  # sync_free(): every row was computed
        return torch.where(keep, values, 0.0).reshape(shape)
    out = values.new_zeros(int(torch.Size(shape).numel()))
    return out.index_put((keep,), values).reshape(shape)


def rows_logprobs(h, weight, t, bias, temperature: float, return_entropy: bool, chunk_size, backend: str):
    """Dispatch on compacted rows: h [n, H], t [n] -> (logp [n], entropy [n] or None)."""
    if backend == "naive" or h.shape[0] == 0:  # no rows (empty or fully masked): nothing for a kernel to do
        return naive_linear_logprobs(h, weight, t, bias, temperature, return_entropy)
    if backend == "triton":
        from fastpmd.kernels import linear_logprobs_triton

        return linear_logprobs_triton(h, weight, t, bias, temperature, return_entropy)
    chunk = torch_chunk_rows(chunk_size, weight.shape[0], h.device)
    logp, ent = ChunkedLinearLogprobs.apply(h, weight, bias, t, 1.0 / temperature, return_entropy, chunk)
    return logp, (ent if return_entropy else None)
