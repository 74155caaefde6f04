"""`fused_linear_pmd_loss(backend="cublas")`: the single pass of fastpmd.fused on cuBLAS GEMMs (6*N*H*V flops),
its row softmax in one Triton kernel that reads the fp32 logits once (fastpmd.kernels.shifted_exp).

Block decomposition (chunk = whole sequences, at most C rows; each chunk's logits built in sub-blocks of s rows):
    for each chunk:
        for each sub-block:  raw = h_s @ W.T                  cuBLAS, fp32 out        [s, V]   2*s*H*V flops
                             E[rows], logp, inv_s = shifted_exp(raw)   one read of raw, one write of E [C, V]
        Delta_i += segment_sum(logp - old);  g = d loss / d logp per token (the chunk's sequences are complete)
        r = -g * inv_s / T                    so that the logits' gradient is r[:, None] * E (shifted_exp)
        grad_h_c = r[:, None] * (E @ W)       cuBLAS, fp32 out                          2*c*H*V flops
        grad_W  += E.T @ (r[:, None] * h_c)   cuBLAS into the fp32 accumulator          2*c*H*V flops
        grad_b  += E.T @ r
    backward: scale the stored gradients by the upstream scalar.
HBM bytes per logit (bf16): raw written 4 + read 4, E written 2 + read by the two GEMMs 2 + 2 = 14; plus the fp32
grad_W accumulator read and written once per chunk (8*V*H). Memory beyond inputs: E [C, V] (weight dtype), raw
[s, V] fp32, the fp32 grad_W accumulator [V, H], grad_h [n, H]. Defaults: E within 1 GiB, raw within 256 MiB
(cost_model.CUBLAS_CHUNK_BYTES / CUBLAS_SUB_BYTES; PREDICTED costs in docs/kernels.md). A sequence longer than a
chunk runs the triton backend's two passes instead, and so do fp16 heads (E holds values up to ~1e18, beyond
fp16's range).

Plain-PyTorch equivalent: fastpmd.fused.SequenceChunkedPMD (the torch backend's single pass), same values and
gradients; both equal pmd_loss(linear_logprobs(..., backend="naive"), ...).
"""
from __future__ import annotations

import torch

from . import cost_model
from .fused import SequenceChunkedPMD
from .losses import pmd_delta_grad, pmd_objective


def cublas_rows(vocab: int, dtype: torch.dtype, chunk_size: int | None = None) -> int:
    """Rows per chunk: chunk_size, else E [C, V] within cost_model.CUBLAS_CHUNK_BYTES."""
    if chunk_size:
        return int(chunk_size)
    return cost_model.cublas_chunk_rows(vocab, torch.finfo(dtype).bits // 8)


class CublasChunkedPMD(SequenceChunkedPMD):
    """Loss and gradients in the forward; the backward (inherited) scales them. SequenceChunkedPMD's arguments;
    logits sub-blocks of cost_model.CUBLAS_SUB_BYTES of fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, old, adv, seg_ids, valid, divisor, num_seq, tau, inv_temp, chunks,
                grad_enabled):
        # hidden [n, H], targets/old/seg_ids [n], adv/divisor/valid [B], num_seq 0-d; old/adv/divisor fp32
        from fastpmd.kernels.backward import torch_mm_into as mm  # cuBLAS, fp32 accumulation (CPU: fp32 upcast)
        from fastpmd.kernels.shifted_exp import shifted_exp

        f32, dev = torch.float32, hidden.device
        need_h, need_w, need_b = (grad_enabled and ctx.needs_input_grad[i] for i in range(3))
        need_b = need_b and bias is not None
        V, H = weight.shape
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(V, H, dtype=f32, device=dev) if need_w else None         # fp32 accumulator
        grad_b = torch.zeros(V, 1, dtype=f32, device=dev) if need_b else None
        logp = torch.empty(hidden.shape[0], dtype=f32, device=dev)
        delta = torch.zeros(adv.shape[0], dtype=f32, device=dev)
        rows = max(e - s for s, e, _, _ in chunks)
        e_buf = torch.empty(rows, V, dtype=weight.dtype, device=dev)                    # E [C, V]
        sub_rows = max(1, min(rows, cost_model.CUBLAS_SUB_BYTES // (4 * V)))
        raw = torch.empty(sub_rows, V, dtype=f32, device=dev)                           # [s, V] fp32
        inv_s = torch.empty(hidden.shape[0], dtype=f32, device=dev)
        gh_tmp = torch.empty(rows, H, dtype=f32, device=dev) if need_h else None
        w_t = weight.t()
        for s, e, sa, sb in chunks:
            if e == s:
                continue
            for r0 in range(s, e, raw.shape[0]):                                         # logits sub-blocks
                r1 = min(e, r0 + raw.shape[0])
                z = mm(hidden[r0:r1], w_t, raw[: r1 - r0], accumulate=False)
                logp[r0:r1], inv_s[r0:r1] = shifted_exp(z, bias, targets[r0:r1], inv_temp, e_buf[r0 - s:r1 - s])
            local = seg_ids[s:e] - sa
            delta[sa:sb].index_add_(0, local, logp[s:e] - old[s:e])
            if not (need_h or need_w or need_b):
                continue
            coef = pmd_delta_grad(adv[sa:sb], delta[sa:sb], tau, divisor[sa:sb], num_seq)   # d loss / d logp
            r = -coef[local] * inv_s[s:e] * inv_temp                                          # [c]
            E = e_buf[: e - s]
            if need_h:
                gh = mm(E, weight, gh_tmp[: e - s], accumulate=False)
                grad_h[s:e] = (gh * r[:, None]).to(hidden.dtype)
            if need_w:
                mm(E.t(), (hidden[s:e].float() * r[:, None]).to(weight.dtype), grad_w, accumulate=True)
            if need_b:
                mm(E.t(), r[:, None].to(weight.dtype), grad_b, accumulate=True)
        loss, _ = pmd_objective(adv, delta, tau, divisor, valid, num_seq)
        ctx.save_for_backward(grad_h, grad_w, None if grad_b is None else grad_b[:, 0])
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(delta, logp)
        return loss, delta, logp
