"""`fused_linear_pmd_loss`: hidden states -> PMD loss in one call, without [tokens, vocab] logits.

torch backend, when every sequence fits a chunk (the default at moderate vocabularies), one pass of
6*N*H*V flops instead of 8: chunks hold whole sequences, so once a chunk's log-probs are summed per sequence the
per-token upstream gradient c_i = -(A_i - tau*Delta_i) / divisor_i / num_sequences is known while the chunk's
logits are still at hand:
    for each chunk of whole sequences:
        z = h_c @ W.T / T                       # [c, V], 2*c*H*V
        logp_c = z[target] - lse(z); Delta_i = segment_sum(logp_c - old_c); c_i as above
        gz = c_i * (onehot - softmax(z)) / T    # in place in z's storage
        grad_h_c = gz @ W;  grad_W += gz.T @ h_c    # 4*c*H*V, fp32 accumulator for grad_W
    backward: scale the stored gradients by the upstream scalar.
A sequence longer than the chunk falls back to linear_logprobs (recompute in backward, 8*N*H*V) + pmd_loss.
cublas backend: the same single pass with cuBLAS GEMMs and one Triton row sweep (fastpmd.single_pass), for bf16 and
fp32 heads; fp16, a sequence longer than its chunk, torch.compile and CUDA-graph capture run the triton backend.
triton backend: forward kernel, PMD epilogue kernel, recompute backward (fastpmd.kernels).

Plain-PyTorch equivalent:
    pmd_loss(linear_logprobs(hidden, weight, targets, mask=mask, temperature=T, backend="naive"),
             old_logprobs, advantages, mask, tau=tau, length_norm=length_norm)
"""
from __future__ import annotations

import torch

from ._checks import check_count, check_fused_inputs, check_targets_in_range, check_weights
from .chunked import acc_dtype, chunk_backward_matmuls, chunk_softmax_stats_inplace, chunk_logits
from .chunked import grad_from_exp_, logits_buffer, matmul_operand
from .dispatch import compact_rows, plain_head, resolve_backend, sync_free, torch_chunk_rows
from .logprobs import linear_logprobs
from .losses import length_divisor, pmd_delta_grad, pmd_loss, pmd_metrics, pmd_objective


def sequence_chunks(lengths: list[int], chunk: int) -> list[tuple[int, int, int, int]] | None:
    """Greedy groups of whole sequences with at most `chunk` tokens each: (tok_start, tok_end, seq_start,
    seq_end). None when one sequence alone is longer than `chunk`."""
    if max(lengths, default=0) > chunk:
        return None
    out, tok0, seq0, tok = [], 0, 0, 0
    for i, n in enumerate(lengths):
        if tok + n - tok0 > chunk:
            out.append((tok0, tok, seq0, i))
            tok0, seq0 = tok, i
        tok += n
    out.append((tok0, tok, seq0, len(lengths)))
    return out


class SequenceChunkedPMD(torch.autograd.Function):
    """Loss and gradients in the forward (6*N*H*V flops); the backward scales them. Inputs are compacted rows."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, old, adv, seg_ids, valid, divisor, num_seq, tau, inv_temp, chunks,
                grad_enabled):
        # hidden [n, H], targets/old/seg_ids [n], adv/divisor/valid [B], num_seq 0-d.
        # grad_enabled: the caller's torch.is_grad_enabled() (forward itself runs in no-grad mode, and
        # ctx.needs_input_grad ignores grad mode): under torch.no_grad() no gradient work at all.
        acc = acc_dtype(hidden.dtype)
        n_seq = adv.shape[0]
        w_op = matmul_operand(weight)
        need_h, need_w, need_b = (grad_enabled and ctx.needs_input_grad[i] for i in range(3))
        need_b = need_b and bias is not None
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        logp = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        delta = torch.zeros(n_seq, dtype=acc, device=hidden.device)
        adv, divisor, old = adv.to(acc), divisor.to(acc), old.to(acc)
        buf = logits_buffer(max(e - s for s, e, _, _ in chunks), weight, acc)
        for s, e, sa, sb in chunks:
            if e == s:
                continue
            z = chunk_logits(hidden[s:e], w_op, bias, inv_temp, buf)  # [c, V]
            _, logp[s:e], sumexp = chunk_softmax_stats_inplace(z, targets[s:e])  # z <- exp(z - rowmax)
            local = seg_ids[s:e] - sa
            delta[sa:sb].index_add_(0, local, logp[s:e] - old[s:e])
            if need_h or need_w or need_b:
                coef = pmd_delta_grad(adv[sa:sb], delta[sa:sb], tau, divisor[sa:sb], num_seq)  # dL/dlogp per seq
                gz = grad_from_exp_(z, sumexp, targets[s:e], coef[local], inv_temp)
                chunk_backward_matmuls(gz, hidden[s:e], w_op, None if grad_h is None else grad_h[s:e], grad_w,
                                       grad_b)
                del gz
            del z
        loss, _ = pmd_objective(adv, delta, tau, divisor, valid, num_seq)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(delta, logp)
        return loss, delta, logp

    @staticmethod
    def backward(ctx, g_loss, _g_delta, _g_logp):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        g = g_loss.to(torch.float32)
        grad_h = None if grad_h is None else (grad_h * g.to(grad_h.dtype))
        grad_w = None if grad_w is None else grad_w.mul_(g.to(grad_w.dtype)).to(ctx.dtypes[0])
        grad_b = None if grad_b is None else grad_b.mul_(g.to(grad_b.dtype)).to(ctx.dtypes[1])
        return grad_h, grad_w, grad_b, *([None] * 11)


def fused_linear_pmd_loss(
    hidden: torch.Tensor,  # [B, T, H], or packed [n, H]: the rows of mask's True entries, row-major
    weight: torch.Tensor,  # [V, H]
    targets: torch.Tensor,  # [B, T]
    mask: torch.Tensor,  # [B, T]
    old_logprobs: torch.Tensor,  # [B, T]
    advantages: torch.Tensor,  # [B]
    *,
    tau: float | torch.Tensor,  # a number or [B] (per sequence)
    length_norm: bool | float = True,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,  # [V]
    chunk_size: int | None = None,
    num_sequences: int | float | torch.Tensor | None = None,
    backend: str = "auto",
    weights: torch.Tensor | None = None,  # [B] per-sequence weights (rollout correction)
):
    """PMD loss straight from hidden states; returns (loss, metrics) like `pmd_loss`.

    chunk_size: tokens per chunk (default: a 64 MB float32 logits block; cublas: E within 1 GiB).
    backend as in `linear_logprobs`; "cublas" (CUDA, bf16/fp32) is the single pass on cuBLAS GEMMs with a Triton
    row sweep (fastpmd.single_pass; "auto" picks it where the cost model predicts it fastest).
    weights: w_i multiply sequence i's term (as in `pmd_loss`); the fused paths divide its divisor by w_i.
    tau [B]: per-sequence temperatures, run through the scalar-tau kernels as tau' = 1, A' = A/tau_i,
    divisor' = divisor_i/tau_i: (A' - Delta)^2/2/divisor' = (A - tau_i*Delta)^2/(2*tau_i)/divisor_i, same gradient.
    """
    weight, bias = plain_head(hidden, weight, bias)  # a DTensor head is gathered with autograd
    mask, tau, temperature = check_fused_inputs(hidden, weight, targets, mask, old_logprobs, advantages, bias, tau,
                                                temperature, chunk_size, length_norm)
    if weights is not None:
        weights = check_weights(weights, advantages.shape, advantages.device)
    backend = resolve_backend(backend, hidden.device, ("pmd", targets.numel(), weight.shape[1], weight.shape[0],
                                                        hidden.dtype, targets.shape[1]))
    if backend == "cublas" and hidden.dtype not in (torch.bfloat16, torch.float32):
        backend = "triton"  # fp16 cannot hold the single pass's unnormalised softmax operand

    # B = 0: nothing to fuse, the reference path gives loss 0. Under torch.compile or CUDA-graph capture
    # (sync_free) the two-pass form: no compaction and no host-side sequence boundaries (8*N*H*V flops).
    if backend == "naive" or hidden.shape[0] == 0 or sync_free():
        logp = linear_logprobs(hidden, weight, targets, mask=mask, bias=bias, temperature=temperature,
                               chunk_size=chunk_size, backend=backend)  # cublas: triton there
        return pmd_loss(logp, old_logprobs, advantages, mask, tau=tau, length_norm=length_norm,
                        num_sequences=num_sequences, weights=weights)

    lengths = mask.sum(-1)  # [B]
    h, t, idx = compact_rows(hidden, targets, mask)  # [n, H], [n]; host sync: the compacted row count
    check_targets_in_range(t, weight.shape[0])
    old = old_logprobs.reshape(-1).index_select(0, idx)  # [n]
    acc = acc_dtype(hidden.dtype)
    divisor = torch.as_tensor(length_divisor(length_norm, lengths), dtype=acc, device=hidden.device).expand(
        lengths.shape).contiguous()
    if weights is not None:  # w * term / d == term / (d / w): the kernels' per-sequence divisor carries it
        divisor = divisor / weights.to(acc)
    num_seq = torch.as_tensor(check_count("num_sequences", num_sequences, (lengths > 0).sum()), dtype=acc,
                              device=hidden.device)
    adv, old = advantages.to(acc), old.to(acc)
    k_adv, k_div, k_tau = adv, divisor, tau  # what the scalar-tau kernels see
    if isinstance(tau, torch.Tensor):
        tau = tau.to(acc)
        k_adv, k_div, k_tau = adv / tau, divisor / tau, 1.0

    chunks = None
    if backend in ("torch", "cublas"):
        from .single_pass import cublas_rows
        chunk = (cublas_rows(weight.shape[0], weight.dtype, chunk_size) if backend == "cublas" else
                 torch_chunk_rows(chunk_size, weight.shape[0], hidden.device))
        chunks = sequence_chunks(lengths.tolist(), chunk)  # host sync: sequence boundaries
        if chunks is None and backend == "cublas":  # a sequence longer than a chunk: the triton two passes
            backend = "triton"
    if backend == "triton":
        from fastpmd.kernels import fused_linear_pmd_loss_triton

        cu = torch.zeros(lengths.shape[0] + 1, dtype=torch.int32, device=hidden.device)
        cu[1:] = lengths.cumsum(0)
        loss, delta, _ = fused_linear_pmd_loss_triton(h, weight, t, bias, old.float(), k_adv.float(), cu,
                                                      k_div.float(), k_tau, temperature, num_seq.float(),
                                                      check_segments=False)  # cu is valid by construction
    else:
        if chunks is None:  # a sequence longer than a chunk: two passes (recompute), never an unbounded block
            logp = linear_logprobs(hidden, weight, targets, mask=mask, bias=bias, temperature=temperature,
                                   chunk_size=chunk, backend="torch")
            return pmd_loss(logp, old_logprobs, advantages, mask, tau=tau, length_norm=length_norm,
                            num_sequences=num_sequences, weights=weights)
        seg_ids = torch.repeat_interleave(torch.arange(lengths.shape[0], device=hidden.device), lengths)
        fn = SequenceChunkedPMD
        if backend == "cublas":
            from .single_pass import CublasChunkedPMD as fn
        loss, delta, _ = fn.apply(h, weight, bias, t, old, k_adv, seg_ids, lengths > 0, k_div, num_seq, k_tau,
                                  1.0 / temperature, chunks, torch.is_grad_enabled())
    resid = adv - tau * delta
    return loss, pmd_metrics(loss, delta, resid, advantages, lengths)
