"""Fused LM-head log-probs: autograd Function over the logits-tile kernels; no [n, V] logits in memory.

Plain PyTorch equivalent:
    z = (hidden.float() @ weight.float().T + bias.float()) / temperature        # [n, V]
    logp = z.log_softmax(-1).gather(-1, targets[:, None])[:, 0]                  # [n] fp32
    entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)                       # [n] fp32 (optional)

Forward: kernels/logits.py (split-vocab online softmax + merge), saves only (hidden, weight, bias, targets, lse
[, entropy]). Backward: kernels/backward.py (`linear_grads`: dlogits per bounded vocab chunk, then the
gradient GEMMs on cuBLAS or the Triton matmul). Validation before any launch: kernels/backward.py.
"""
from __future__ import annotations

import torch

from ._runtime import arch_of, on_device
from .backward import linear_grads, validate_linear
from .logits import logits_stats


class LinearLogprobsFunction(torch.autograd.Function):
    """autograd over logits_stats (forward) and linear_grads (backward)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, return_entropy, arch):
        with on_device(hidden.device):
            logp, lse, ent = logits_stats(hidden, weight, bias, targets, temperature, return_entropy, arch)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.temperature, ctx.arch, ctx.return_entropy = temperature, arch, return_entropy
        if not return_entropy:
            ent = logp.new_empty(0)
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        g_ent = g_ent.float().contiguous() if ctx.return_entropy else None
        with on_device(hidden.device):
            gh, gw, gb = linear_grads(hidden, weight, bias, targets, lse, ent, g_logp.float().contiguous(), g_ent,
                                      ctx.temperature, needs, ctx.arch)
        return gh, gw, gb, None, None, None, None


def linear_logprobs_triton(hidden, weight, targets, bias=None, temperature: float = 1.0,
                           return_entropy: bool = False):
    """Per-token log-probs (and entropies) of targets under softmax((hidden @ weight.T + bias) / temperature).

    hidden [n, H], weight [V, H], targets [n] int, bias [V] or None -> (logp [n] fp32, entropy [n] fp32 | None).
    Differentiable in hidden, weight and bias; gradients come back in the inputs' dtypes."""
    validate_linear(hidden, weight, targets, bias, temperature, "linear_logprobs_triton")
    arch = arch_of(hidden.device)
    bias = bias.contiguous() if bias is not None else None    # the kernels read bias[v] at offset v
    logp, ent = LinearLogprobsFunction.apply(hidden, weight, bias, targets.long().contiguous(),
                                             float(temperature), bool(return_entropy), arch)
    return logp, (ent if return_entropy else None)
