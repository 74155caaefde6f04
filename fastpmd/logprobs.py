"""`linear_logprobs`: log pi(target) of the LM head without materialising [tokens, vocab] logits."""
from __future__ import annotations

import torch

from ._checks import check_chunk_size, check_head_finite, check_lm_head, check_mask, check_positive
from ._checks import check_targets_in_range, is_packed
from .dispatch import compact_rows, plain_head, resolve_backend, rows_logprobs, scatter_rows, sync_free


def linear_logprobs(
    hidden: torch.Tensor,  # [..., H], or packed [n, H]: the rows of mask's True entries (targets, mask [B, T])
    weight: torch.Tensor,  # [V, H]
    targets: torch.Tensor,  # [...] int, in [0, V) where mask is True
    *,
    mask: torch.Tensor | None = None,  # [...] bool
    bias: torch.Tensor | None = None,  # [V]
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
):
    """Per-token log pi(target) (float32, shape of targets; 0 where mask is False), and optionally the entropy.

    Plain-PyTorch equivalent (what backend="naive" does, and what the others match):
        z = ((hidden @ weight.T + bias).float()) / temperature
        logp = torch.log_softmax(z, -1).gather(-1, targets[..., None])[..., 0] * mask
        entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1) * mask
    backend: "naive" (materialises logits), "torch" (chunked, recompute in backward), "triton" (fused kernels,
    CUDA), "auto" (on CUDA the one predicted faster, fastpmd.cost_model; torch elsewhere); "cublas" (the PMD
    loss's single pass, fused_linear_pmd_loss) runs triton here. Masked rows are
    compacted away: no matrix work, no gradient.
    The backward takes any upstream gradient on logp and entropy; grad_weight accumulates in float32.
    A DTensor weight/bias (sharded or replicated) is gathered with autograd (`full_tensor()`); its gradient comes
    back as a DTensor in the same placements.
    """
    weight, bias = plain_head(hidden, weight, bias)  # a DTensor head is gathered with autograd
    packed = is_packed(hidden, targets, mask)
    check_lm_head(hidden, weight, targets, bias, packed)
    temperature = check_positive("temperature", temperature)
    check_chunk_size(chunk_size)
    mask = check_mask(mask, targets.shape, hidden.device)
    check_head_finite(hidden, weight, bias, None if packed else mask)
    rows = hidden.shape[0] if packed else targets.numel()
    backend = resolve_backend(backend, hidden.device, ("logprobs", rows, weight.shape[1], weight.shape[0],
                                                        hidden.dtype, None))
    if backend == "cublas":  # the PMD loss's single pass; log-probs alone (any upstream gradient) run the kernels
        backend = "triton"

    h, t, idx = compact_rows(hidden, targets, mask)
    if not sync_free():  # a host sync: skipped under torch.compile / CUDA-graph capture (docs/API.md)
        check_targets_in_range(t, weight.shape[0])
    logp, ent = rows_logprobs(h, weight, t, bias, temperature, return_entropy, chunk_size, backend)
    logp = scatter_rows(logp, idx, targets.shape)
    if not return_entropy:
        return logp
    return logp, scatter_rows(ent, idx, targets.shape)
