"""Chunked LM-head log-probs in plain PyTorch: the CPU path and the portable fallback of fastpmd.

Block decomposition (rows = compacted tokens, c = chunk rows, never more than one [c, V] block alive):
    forward:   for each chunk of rows:  z = (h_c @ W.T + b) / T          # [c, V], 2*c*H*V flops
                                         lse_c = logsumexp(z); logp_c = z[target] - lse_c; (entropy_c)
               saves hidden, weight, bias, targets, lse (+ entropy): nothing vocab-sized.
    backward:  for each chunk:  recompute z (2*c*H*V)
                                 gz = g_logp * (onehot - p) - g_ent * p * (log p + H),  / T    # [c, V]
                                 grad_h_c = gz @ W (2*c*H*V);  grad_W += gz.T @ h_c (2*c*H*V, fp32 accumulator)
    total 8*N*H*V flops; extra memory ~2 chunk blocks + the fp32 grad_weight accumulator.

Plain-PyTorch equivalent: fastpmd.naive.naive_linear_logprobs (same values, same gradients).
"""
from __future__ import annotations

import torch

DEFAULT_CHUNK_BYTES = 64 * 2**20  # one [c, V] float32 logits block
# log p is floored here before it multiplies p: a masked column (bias -inf) has log p = -inf and p = 0, and
# 0 * -inf is NaN. exp(-1e4) is 0 in float32 and float64, so the floor changes no p > 0 and no product.
LOGP_FLOOR = -1e4


def default_chunk_rows(vocab: int, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    return int(max(16, min(8192, budget_bytes // (4 * vocab))))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (the oracle); everything else computes softmax in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def matmul_operand(weight: torch.Tensor) -> torch.Tensor:
    """The weight as a matmul operand. CPU kernels have no bf16/fp16 x -> fp32 product, so half weights are
    upcast once per pass there (an extra [V, H] fp32 copy: the CPU half path trades memory for exact logits)."""
    if weight.dtype in (torch.float16, torch.bfloat16) and weight.device.type == "cpu":
        return weight.float()
    return weight


def logits_buffer(rows: int, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One [rows, V] block reused by every chunk of a pass: no allocation (and no page faults) per chunk."""
    return torch.empty(rows, weight.shape[0], dtype=dtype, device=weight.device)


def chunk_logits(h: torch.Tensor, w_op: torch.Tensor, bias: torch.Tensor | None, inv_temp: float,
                 buf: torch.Tensor | None = None) -> torch.Tensor:
    """z = ((h @ W.T + bias) * inv_temp) in the accumulation dtype. h [c, H], w_op [V, H] -> [c, V],
    written into buf[:c] when given and the product's dtype is the accumulation dtype."""
    acc = acc_dtype(h.dtype)
    if w_op.dtype != h.dtype:  # CPU half path: w_op was upcast
        h = h.to(w_op.dtype)
    out = buf[: h.shape[0]] if (buf is not None and h.dtype == acc) else None
    if bias is not None:
        z = torch.addmm(bias.to(h.dtype), h, w_op.T, out=out) if out is not None else torch.addmm(
            bias.to(h.dtype), h, w_op.T)
    else:
        z = torch.mm(h, w_op.T, out=out) if out is not None else h @ w_op.T
    z = z.to(acc)
    if inv_temp != 1.0:
        z.mul_(inv_temp)
    return z


def chunk_entropy_stats(z: torch.Tensor, targets: torch.Tensor):
    """From logits z [c, V]: (lse [c], logp [c], entropy [c]). Leaves z unchanged."""
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(1, targets[:, None])[:, 0] - lse
    logp_all = (z - lse[:, None]).clamp_(min=LOGP_FLOOR)  # H = -sum p log p (lse - E[z] cancels when peaked)
    # an elementwise product and torch.sum's blocked reduction: a [c,1,V]x[c,V,1] bmm accumulates V terms in one
    # float32 chain (1e-3 nats off at V = 151,936), the sum as accurately as the naive path (~1e-5)
    entropy = -logp_all.exp().mul_(logp_all).sum(-1)
    return lse, logp, entropy


def chunk_softmax_stats_inplace(z: torch.Tensor, targets: torch.Tensor):
    """In place, 4 passes over z [c, V]: z <- exp(z - rowmax) (unnormalised probabilities).
    Returns (lse [c], logp of the targets [c], row sums of exp [c])."""
    z_target = z.gather(1, targets[:, None])[:, 0]
    zmax = z.amax(-1)
    z.sub_(zmax[:, None]).exp_()
    sumexp = z.sum(-1)
    lse = zmax + sumexp.log()
    return lse, z_target - lse, sumexp


def grad_from_exp_(e, sumexp, targets, g_logp, inv_temp: float) -> torch.Tensor:
    """In place on e = exp(z - c) [c, V] with row sums sumexp [c] (p = e / sumexp):
    returns g_logp * (onehot - p) * inv_temp, the gradient of sum(g_logp * logp) w.r.t. the raw logits."""
    g = g_logp.to(e.dtype) * inv_temp
    gz = e.mul_((-g / sumexp)[:, None])
    return gz.scatter_add_(1, targets[:, None], g[:, None])


def chunk_grad_logits(z, lse, targets, g_logp, g_ent, entropy, inv_temp: float) -> torch.Tensor:
    """d(loss)/d(raw logits) for one chunk, computed in place in z's storage (plus one block with entropy).

    g_logp [c] and g_ent [c] (or None) are the upstream gradients; the result is
    (g_logp * (onehot - p) - g_ent * p * (log p + H)) * inv_temp, shape [c, V].
    """
    z.sub_(lse[:, None]).clamp_(min=LOGP_FLOOR)  # log p (floored: masked columns stay finite, p = 0)
    if g_ent is None:
        return grad_from_exp_(z.exp_(), torch.ones_like(lse), targets, g_logp, inv_temp)
    p = z.exp()
    coeff = z.add_(entropy[:, None]).mul_(g_ent[:, None]).add_(g_logp[:, None])  # g + g_ent*(log p + H)
    gz = p.mul_(coeff).neg_()
    gz.scatter_add_(1, targets[:, None], g_logp[:, None].to(gz.dtype))
    if inv_temp != 1.0:
        gz.mul_(inv_temp)
    return gz


def chunk_backward_matmuls(gz, h, w_op, grad_h_out, grad_w_acc, grad_b_acc) -> None:
    """grad_h_out [c, H] (written, or None) = gz @ W; grad_w_acc [V, H] += gz.T @ h; grad_b_acc [V] += sum(gz)."""
    if grad_h_out is not None:
        if grad_h_out.dtype == gz.dtype == w_op.dtype:
            torch.mm(gz, w_op, out=grad_h_out)
        else:
            grad_h_out.copy_(gz.to(w_op.dtype) @ w_op)
    if grad_w_acc is not None:
        grad_w_acc.addmm_(gz.T, h.to(grad_w_acc.dtype))
    if grad_b_acc is not None:
        grad_b_acc.add_(gz.sum(0))


class ChunkedLinearLogprobs(torch.autograd.Function):
    """(hidden [n, H], weight [V, H], bias [V] | None, targets [n]) -> (logp [n], entropy [n] or [0])."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_temp: float, return_entropy: bool, chunk: int):
        n, acc = hidden.shape[0], acc_dtype(hidden.dtype)
        logp = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        entropy = torch.empty(n if return_entropy else 0, dtype=acc, device=hidden.device)
        w_op = matmul_operand(weight)
        buf = logits_buffer(min(chunk, n), weight, acc)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            z = chunk_logits(hidden[s:e], w_op, bias, inv_temp, buf)
            if return_entropy:
                lse[s:e], logp[s:e], entropy[s:e] = chunk_entropy_stats(z, targets[s:e])
            else:
                lse[s:e], logp[s:e], _ = chunk_softmax_stats_inplace(z, targets[s:e])
            del z
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.inv_temp, ctx.return_entropy, ctx.chunk = inv_temp, return_entropy, chunk
        ctx.mark_non_differentiable(lse)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, acc = hidden.shape[0], lse.dtype
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.to(acc)
        g_ent = g_ent.to(acc) if (ctx.return_entropy and g_ent is not None) else None
        w_op = matmul_operand(weight)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if (need_b and bias is not None) else None
        buf = logits_buffer(min(ctx.chunk, n), weight, acc)
        for s in range(0, n, ctx.chunk):
            e = min(n, s + ctx.chunk)
            z = chunk_logits(hidden[s:e], w_op, bias, ctx.inv_temp, buf)
            gz = chunk_grad_logits(
                z, lse[s:e], targets[s:e], g_logp[s:e],
                None if g_ent is None else g_ent[s:e], None if g_ent is None else entropy[s:e], ctx.inv_temp,
            )
            chunk_backward_matmuls(gz, hidden[s:e], w_op, None if grad_h is None else grad_h[s:e], grad_w, grad_b)
            del z, gz
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None
