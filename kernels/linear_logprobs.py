"""Fused LM-head log-probs: autograd Function over the logits-tile kernels; no [n, V] logits in memory.

Plain PyTorch equivalent:
    z = (hidden.float() @ weight.float().T + bias.float()) / temperature        # [n, V]
    logp = z.log_softmax(-1).gather(-1, targets[:, None])[:, 0]                  # [n] fp32
    entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)                       # [n] fp32 (optional)

Forward: kernels/logits.py (split-vocab online softmax + merge), saves only (hidden, weight, bias, targets, lse
[, entropy]). Backward (`linear_grads`), per vocab chunk of chunk_v columns:
    dz[n, chunk_v]  = dlogits tile kernel (recomputes the logits tiles)     2*n*H*chunk_v flops
    grad_h[n, H]   += dz @ weight[chunk]           (matmul, fp32 accumulator) 2*n*H*chunk_v flops
    grad_w[chunk]   = dz.T @ hidden                (matmul, fp32 in registers over all n tokens)
    grad_b[chunk]   = dz.sum(0)
How partial sums are combined: a bounded dlogits buffer per vocab chunk ("second reduction" through memory)
rather than atomics. Fully fused alternatives must read-modify-write one of the [*, H] gradients for every
(token tile, vocab tile) pair: 8*(BLOCK_N + BLOCK_V)*H bytes per 8*BLOCK_N*BLOCK_V*H flops, i.e. 64 flop/byte
for 128x128 tiles, far below the H100 ridge point of 295 flop/byte (and fp32 atomics add contention and
non-determinism). With chunks, grad_weight rows are written exactly once (fp32 accumulation over all tokens in
registers, deterministic) and grad_hidden is read-modified-written once per chunk: intensity
2*n*H*chunk_v / (8*n*H) = chunk_v/4 flop/byte (2048 at chunk_v = 8192: n = 16384, 256 MiB budget).
The dlogits buffer holds chunk_v columns, never the whole vocabulary (configs.DLOGITS_BUDGET_BYTES).
dlogits precision: bf16 inputs -> bf16 buffer (bf16 has fp32's exponent range); fp16 and fp32 inputs -> fp32
buffer (fp16 would flush small p*g to zero), multiplied on TF32 (fp16) or exact fp32 (fp32) dots.
"""
from __future__ import annotations

import torch

from . import _runtime
from ._runtime import arch_of, check_runnable, max_offset, on_device, triton
from . import configs
from .logits import dlogits_chunk, logits_stats
from .matmul import matmul_into


def validate_linear(hidden, weight, targets, bias, temperature: float, what: str) -> None:
    """ValueError naming the argument on bad shapes/dtypes/devices; RuntimeError when Triton cannot run."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2 or not hidden.is_floating_point():
        raise ValueError(f"{what}: hidden must be a floating [n, H] tensor")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"{what}: weight must be [V, H] with H = hidden.shape[1] = {hidden.shape[1]}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"{what}: weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{what}: hidden dtype must be float32, float16 or bfloat16, got {hidden.dtype}")
    if not isinstance(targets, torch.Tensor) or targets.shape != hidden.shape[:1] or targets.is_floating_point():
        raise ValueError(f"{what}: targets must be an integer [n] tensor with n = {hidden.shape[0]}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"{what}: bias must be [V] with V = {weight.shape[0]}")
    check_spans(hidden, weight, what)
    if not float(temperature) > 0:
        raise ValueError(f"{what}: temperature must be > 0, got {temperature}")
    for name, t in (("weight", weight), ("targets", targets), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{what}: {name} is on {t.device}, hidden on {hidden.device}")
    check_runnable(hidden.device, what)


def check_spans(hidden, weight, what: str) -> None:
    """The kernels' in-tile offsets are 32-bit: every operand's span (largest element offset, from its strides)
    must be < INDEX_LIMIT. Checked before any launch; the error names the operand that is too large."""
    lim = _runtime.INDEX_LIMIT
    n, H = hidden.shape
    V = weight.shape[0]
    # hidden, the fp32 grad_hidden accumulator [n, H] and the smallest dlogits chunk [n, 128] grow with the tokens
    tok_span = max(max_offset(hidden), n * H - 1, n * 128 - 1)
    if n and tok_span >= lim:
        raise ValueError(f"{what}: hidden [n={n}, H={H}] (strides {tuple(hidden.stride())}) spans {tok_span + 1} "
                         f"elements; the kernels' 32-bit offsets need < {lim}: split the tokens into smaller calls")
    if max_offset(weight) >= lim:
        raise ValueError(f"{what}: weight [V={V}, H={H}] (strides {tuple(weight.stride())}) spans "
                         f"{max_offset(weight) + 1} elements; the kernels' 32-bit offsets need < {lim} (splitting "
                         "the tokens does not help: shard the vocabulary, e.g. tensor-parallel LM head)")


def chunk_columns(n: int, V: int, elt: int, block_v: int) -> int:
    """Vocab columns per backward chunk: the dlogits buffer [n, chunk] fits configs.DLOGITS_BUDGET_BYTES, and
    n * chunk < INDEX_LIMIT whatever the budget (the buffer is addressed with 32-bit in-tile offsets)."""
    cols = configs.DLOGITS_BUDGET_BYTES // max(1, n * elt) // block_v * block_v
    cap = (_runtime.INDEX_LIMIT - 1) // max(1, n) // block_v * block_v
    if cap < block_v:
        raise ValueError(f"chunk_columns: {n} tokens x {block_v} columns reach {_runtime.INDEX_LIMIT} elements; "
                         "split the tokens into smaller calls")
    return max(block_v, min(cols, cap, triton.cdiv(V, block_v) * block_v))


def linear_grads(hidden, weight, bias, targets, lse, ent, g_logp, g_ent, temperature: float,
                 needs: tuple[bool, bool, bool], arch: str):
    """(grad_hidden, grad_weight, grad_bias) for upstream grads g_logp [n] (and g_ent [n] or None)."""
    need_h, need_w, need_b = needs
    n, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    alloc = torch.empty if n > 0 and V > 0 else torch.zeros   # otherwise every entry is written by the loop
    gh = alloc(n, H, device=dev, dtype=torch.float32) if need_h else None           # [n, H] fp32 accumulator
    gw = alloc(V, H, device=dev, dtype=weight.dtype) if need_w else None           # [V, H], rows written once
    gb = alloc(V, device=dev, dtype=torch.float32) if need_b else None             # [V]
    if n > 0 and any(needs):
        dz_dtype = torch.bfloat16 if hidden.dtype == torch.bfloat16 else torch.float32
        fam = configs.logits_family(arch, hidden.dtype == torch.float32)
        cfg = configs.pick("logits_bwd", fam)
        cv = chunk_columns(n, V, torch.finfo(dz_dtype).bits // 8, cfg.blocks["BLOCK_V"])
        dz = torch.empty(n, cv, device=dev, dtype=dz_dtype)     # [n, chunk_v] dlogits buffer
        if configs.autotune_enabled() and arch != "interp":      # time candidates on the first chunk (scratch)
            cfg = configs.pick("logits_bwd", fam, (H, V, n.bit_length(), str(hidden.dtype)), bench=lambda c: (
                dlogits_chunk(hidden, weight, bias, targets, lse, ent, g_logp, g_ent, temperature, 0,
                              min(V, cv), dz, arch, c)))
        for i, v0 in enumerate(range(0, V, cv)):
            v1 = min(V, v0 + cv)
            dlogits_chunk(hidden, weight, bias, targets, lse, ent, g_logp, g_ent, temperature, v0, v1, dz,
                          arch, cfg)
            d = dz[:, : v1 - v0]                                 # [n, chunk]
            if need_h:
                matmul_into(d, weight[v0:v1], gh, accumulate=i > 0, arch=arch)
            if need_w:
                matmul_into(d.t(), hidden, gw[v0:v1], accumulate=False, arch=arch)
            if need_b:
                gb[v0:v1] = d.sum(0, dtype=torch.float32)
    return (gh.to(hidden.dtype) if need_h else None, gw, gb.to(bias.dtype) if need_b else None)


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
