"""PMD-mean epilogue kernel and the fused hidden-states -> PMD loss autograd Function.

Plain PyTorch equivalent of the epilogue (segments i = [cu_seqlens[i], cu_seqlens[i+1]) of the compacted tokens):
    delta[i]  = (logp - old_logp)[seg_i].sum()                                   # [B]
    resid[i]  = advantages[i] - tau * delta[i]
    loss      = sum_i (resid[i]**2 / (2*tau) / divisor[i] / num_sequences)  over non-empty segments
    g_tok[t]  = dloss/dlogp[t] = -resid[i] / divisor[i] / num_sequences  for t in seg_i
Block decomposition: program i = segment i; loop over its tokens in BLOCK chunks twice (sum, then write g_tok).
Flops ~3n; bytes 12n (logp, old_logp read, g_tok written) + 20B. Runtime args only (no recompilation per batch);
num_sequences is read from device memory (no host sync). The scalar loss is the sum of the [B] per-segment
terms (a deterministic torch reduction instead of float atomics).

Fused path (fused_linear_pmd_loss_triton): logits forward kernel + merge -> this epilogue -> (backward) dlogits
kernel with upstream g_tok * dloss -> gradient GEMMs (kernels/backward.py, linear_grads).
"""
from __future__ import annotations

import torch

from ._runtime import arch_of, on_device, tl, triton
from . import configs
from .backward import linear_grads, validate_linear
from .logits import logits_stats


@triton.jit
def _pmd_epilogue_kernel(
    # pointers
    logp_ptr, old_ptr, adv_ptr, cu_ptr, div_ptr, nseq_ptr,   # [n], [n], [B], [B+1] int32, [B], 0-d
    delta_ptr, term_ptr, gtok_ptr,                            # outputs [B], [B], [n] fp32
    # scalars
    tau,
    # meta
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0)
    start = tl.load(cu_ptr + i).to(tl.int64)
    end = tl.load(cu_ptr + i + 1).to(tl.int64)
    acc = tl.zeros([BLOCK], tl.float32)
    for t0 in range(start, end, BLOCK):
        offs = t0 + tl.arange(0, BLOCK)
        ok = offs < end
        acc += tl.load(logp_ptr + offs, mask=ok, other=0.0) - tl.load(old_ptr + offs, mask=ok, other=0.0)
    delta = tl.sum(acc, 0)
    scale = 1.0 / (tl.load(div_ptr + i) * tl.load(nseq_ptr))
    resid = tl.load(adv_ptr + i) - tau * delta
    term = tl.where(end > start, resid * resid / (2.0 * tau) * scale, 0.0)
    tl.store(delta_ptr + i, delta)
    tl.store(term_ptr + i, term)
    g = -resid * scale
    for t0 in range(start, end, BLOCK):
        offs = t0 + tl.arange(0, BLOCK)
        tl.store(gtok_ptr + offs, tl.zeros([BLOCK], tl.float32) + g, mask=offs < end)


def pmd_epilogue(logp, old_logp, advantages, cu_seqlens, divisor, num_sequences, tau: float, arch: str):
    """(loss 0-d, delta [B], g_tok [n]) from per-token logp; see the module docstring."""
    B = advantages.shape[0]
    dev = logp.device
    delta = torch.empty(B, device=dev, dtype=torch.float32)
    terms = torch.empty(B, device=dev, dtype=torch.float32)
    g_tok = torch.zeros_like(logp)      # tokens outside every segment get no gradient (the kernel skips them)
    if B > 0:
        cfg = configs.pick("pmd_epilogue", arch)
        _pmd_epilogue_kernel[(B,)](logp, old_logp, advantages, cu_seqlens, divisor, num_sequences,
                                   delta, terms, g_tok, float(tau), **cfg.meta())
    return terms.sum(), delta, g_tok


class FusedLinearPMDLossFunction(torch.autograd.Function):
    """loss(hidden, weight, bias); delta and logp are returned detached."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, old_logp, advantages, cu_seqlens, divisor, num_sequences,
                tau, temperature, arch):
        with on_device(hidden.device):
            logp, lse, _ = logits_stats(hidden, weight, bias, targets, temperature, False, arch)
            loss, delta, g_tok = pmd_epilogue(logp, old_logp, advantages, cu_seqlens, divisor, num_sequences, tau,
                                              arch)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, g_tok)
        ctx.temperature, ctx.arch = temperature, arch
        ctx.mark_non_differentiable(delta, logp)
        return loss, delta, logp

    @staticmethod
    def backward(ctx, g_loss, g_delta, g_logp):
        hidden, weight, bias, targets, lse, g_tok = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        with on_device(hidden.device):
            gh, gw, gb = linear_grads(hidden, weight, bias, targets, lse, None, g_tok * g_loss.float(), None,
                                      ctx.temperature, needs, ctx.arch)
        return (gh, gw, gb) + (None,) * 9


def fused_linear_pmd_loss_triton(hidden, weight, targets, bias, old_logp, advantages, cu_seqlens, divisor,
                                 tau: float, temperature: float, num_sequences: torch.Tensor, *,
                                 check_segments: bool = True):
    """PMD-mean loss straight from hidden states, logits never in memory.

    hidden [n, H] (compacted valid tokens), weight [V, H], targets [n], bias [V] | None, old_logp [n] fp32,
    advantages [B] fp32, cu_seqlens [B+1] int32, divisor [B] fp32, num_sequences 0-d fp32
    -> (loss 0-d fp32 differentiable in hidden/weight/bias, delta [B] fp32 detached, logp [n] fp32 detached).
    check_segments: verify cu_seqlens (one host sync); fastpmd.fused_linear_pmd_loss, which builds it from the
    mask itself (cumsum of the lengths, ending at n by construction), passes False."""
    what = "fused_linear_pmd_loss_triton"
    validate_linear(hidden, weight, targets, bias, temperature, what)
    n = hidden.shape[0]
    if not isinstance(advantages, torch.Tensor) or advantages.dim() != 1:
        raise ValueError(f"{what}: advantages must be a [B] tensor")
    B = advantages.shape[0]
    for name, t, shape in (("old_logp", old_logp, (n,)), ("cu_seqlens", cu_seqlens, (B + 1,)),
                           ("divisor", divisor, (B,)), ("num_sequences", num_sequences, ())):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            raise ValueError(f"{what}: {name} must have shape {shape}")
        if t.device != hidden.device:
            raise ValueError(f"{what}: {name} is on {t.device}, hidden on {hidden.device}")
    if cu_seqlens.is_floating_point():
        raise ValueError(f"{what}: cu_seqlens must be an integer tensor")
    if check_segments:  # one host sync of three integers: segments out of [0, n] would read out of bounds
        first, last, n_bad = torch.stack([cu_seqlens[0], cu_seqlens[-1],
                                          (cu_seqlens[1:] < cu_seqlens[:-1]).sum()]).tolist()
        if first < 0 or last != n or n_bad:
            raise ValueError(f"{what}: cu_seqlens must be non-decreasing from >= 0 to n = {n} (the compacted "
                             f"tokens); got first {first}, last {last}, {n_bad} decreasing steps")
    if not float(tau) > 0:
        raise ValueError(f"{what}: tau must be > 0, got {tau}")
    arch = arch_of(hidden.device)
    f32 = torch.float32
    bias = bias.contiguous() if bias is not None else None    # the kernels read bias[v] at offset v
    return FusedLinearPMDLossFunction.apply(
        hidden, weight, bias, targets.long().contiguous(), old_logp.to(f32).contiguous(),
        advantages.to(f32).contiguous(), cu_seqlens.to(torch.int32).contiguous(), divisor.to(f32).contiguous(),
        num_sequences.to(f32).reshape(1), float(tau), float(temperature), arch)
