"""Backward driver of the fused LM head (`linear_grads`) and the validation run before any kernel launch.

Plain PyTorch equivalent (z = (h @ W.T + b) / T, p = softmax(z), upstream gradients g_logp [n], g_ent [n]):
    dz = (g_logp[:, None] * (onehot(targets) - p) - g_ent[:, None] * p * (log p + entropy[:, None])) / T
    grad_hidden = dz @ W;  grad_weight = dz.T @ h;  grad_bias = dz.sum(0)

Block decomposition, per vocab chunk [v0, v1) of chunk_v columns:
    dz[n, chunk_v]  = dlogits kernel (kernels/dlogits.py, recomputes the logits)        2*n*H*chunk_v flops
    grad_h[n, H]   += dz @ weight[chunk]           (fp32 accumulator)                   2*n*H*chunk_v flops
    grad_w[chunk]   = dz.T @ hidden                (fp32 accumulation over all n tokens) 2*n*H*chunk_v flops
    grad_b[chunk]   = dz.sum(0)
The two GEMMs run on cuBLAS (`torch.mm` / `torch.addmm`, fp32 accumulation, out_dtype=float32 for the fp32
grad_h; the CUDA default for bf16) or on the Triton matmul (kernels/matmul.py: the interpreter, fp32 inputs'
exact dots, fp16's fp32 dlogits x fp16 operands); `configs.grad_gemm` decides, FASTPMD_GRAD_GEMM overrides.
How partial sums are combined: a bounded dlogits buffer per vocab chunk ("second reduction" through memory)
rather than atomics. Fully fused alternatives must read-modify-write one of the [*, H] gradients for every
(token tile, vocab tile) pair: 8*(BLOCK_N + BLOCK_V)*H bytes per 8*BLOCK_N*BLOCK_V*H flops, i.e. 64 flop/byte
for 128x128 tiles, far below the H100 ridge point of 295 flop/byte (and fp32 atomics add contention and
non-determinism). With chunks, grad_weight rows are written exactly once and grad_hidden is read-modified-
written once per chunk: intensity 2*n*H*chunk_v / (8*n*H) = chunk_v/4 flop/byte (2048 at chunk_v = 8192).
The dlogits buffer holds chunk_v columns, never the whole vocabulary (configs.DLOGITS_BUDGET_BYTES; n * chunk_v
< 2**31 always). dlogits precision: bf16 inputs -> bf16 buffer (bf16 has fp32's exponent range); fp16 and
fp32 inputs -> fp32 buffer (fp16 would flush small p*g to zero).
"""
from __future__ import annotations

import contextlib

import torch

from . import _runtime, configs, grad_filter
from ._runtime import check_runnable, max_offset, triton
from .dlogits import dlogits_chunk
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
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets), ("bias", bias)):
        if t is not None and t.numel() > 0 and t.device.type != "meta" and t.data_ptr() == 0:  # a null pointer
            raise ValueError(f"{what}: {name} ({type(t).__name__}) has no local storage (data_ptr() == 0), e.g. "
                             "a DTensor: pass a plain tensor (fastpmd.linear_logprobs gathers a DTensor head)")
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
    """Vocab columns per backward chunk: the dlogits buffer [n, chunk] fits configs.DLOGITS_BUDGET_BYTES, but
    never fewer than configs.min_chunk_columns() (8192 at the default budget: the budget grows with n beyond
    16384 tokens, so grad_hidden's read-modify-write traffic grows like n, not n^2), and n * chunk <
    INDEX_LIMIT whatever the budget (the buffer is addressed with 32-bit in-tile offsets)."""
    cols = max(configs.DLOGITS_BUDGET_BYTES // max(1, n * elt), configs.min_chunk_columns()) // block_v * block_v
    cap = (_runtime.INDEX_LIMIT - 1) // max(1, n) // block_v * block_v
    if cap < block_v:
        raise ValueError(f"chunk_columns: {n} tokens x {block_v} columns reach {_runtime.INDEX_LIMIT} elements; "
                         "split the tokens into smaller calls")
    return max(block_v, min(cols, cap, triton.cdiv(V, block_v) * block_v))


def torch_mm_into(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, accumulate: bool) -> torch.Tensor:
    """c (+)= a @ b through torch: cuBLAS on CUDA with fp32 accumulation (16-bit operands into an fp32 c use
    out_dtype=torch.float32, accumulating in place with addmm). Where torch has no such kernel (CPU, mixed
    operand dtypes) the operands are upcast to fp32: same math, more memory (used on CPU by the tests)."""
    if a.is_cuda and a.dtype == b.dtype and c.dtype in (a.dtype, torch.float32):
        if c.dtype == a.dtype:
            with full_precision_reduction():
                return c.addmm_(a, b) if accumulate else torch.mm(a, b, out=c)
        if accumulate:
            return addmm_fp32_(c, a, b)
        return torch.mm(a, b, out_dtype=torch.float32, out=c)
    prod = a.float() @ b.float()
    return c.add_(prod) if accumulate else c.copy_(prod)


# torch's messages when addmm.dtype's self (the fp32 accumulator) must have the operands' dtype (older torch)
_ADDMM_SELF_DTYPE = ("self and mat2 must have the same dtype", "self dtype must match")


def addmm_fp32_(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """c += a @ b for 16-bit a, b into fp32 c: in place (cuBLAS beta = 1) where torch allows an fp32 self, else
    through an fp32 temporary. Only that unsupported-argument error is caught: out-of-memory and every other
    error propagate."""
    try:
        return torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
    except RuntimeError as e:
        if isinstance(e, torch.OutOfMemoryError) or not any(m in str(e) for m in _ADDMM_SELF_DTYPE):
            raise
        return c.add_(torch.mm(a, b, out_dtype=torch.float32))


@contextlib.contextmanager
def full_precision_reduction():
    """cuBLAS GEMMs with a 16-bit output reduce (split-K) in fp32 inside the block: torch's default allows bf16/
    fp16 reduced-precision reductions, which at large K (grad_W sums over every token) lose accuracy."""
    m = torch.backends.cuda.matmul
    old = m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction
    m.allow_bf16_reduced_precision_reduction = m.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction = old


def linear_grads(hidden, weight, bias, targets, lse, ent, g_logp, g_ent, temperature: float,
                 needs: tuple[bool, bool, bool], arch: str):
    """(grad_hidden, grad_weight, grad_bias) for upstream grads g_logp [n] (and g_ent [n] or None).
    Gradient filtering (kernels/grad_filter.py) when FASTPMD_GRAD_FILTER is set."""
    need_h, need_w, need_b = needs
    eps = grad_filter.filter_eps()
    n, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    alloc = torch.empty if n > 0 and V > 0 else torch.zeros   # otherwise every entry is written by the loop
    gh = alloc(n, H, device=dev, dtype=torch.float32) if need_h else None           # [n, H] fp32 accumulator
    gw = alloc(V, H, device=dev, dtype=weight.dtype) if need_w else None           # [V, H], rows written once
    gb = alloc(V, device=dev, dtype=torch.float32) if need_b else None             # [V]
    if n == 0 or not any(needs):
        return (gh.to(hidden.dtype) if need_h else None, gw, gb.to(bias.dtype) if need_b else None)
    dz_dtype = torch.bfloat16 if hidden.dtype == torch.bfloat16 else torch.float32
    fam = configs.family("logits_bwd", arch, hidden.dtype)
    cfg = configs.pick("logits_bwd", fam)
    cv = chunk_columns(n, V, torch.finfo(dz_dtype).bits // 8, cfg.blocks["BLOCK_V"])
    dz = torch.empty(n, cv, device=dev, dtype=dz_dtype)         # [n, chunk_v] dlogits buffer
    if configs.autotune_enabled() and arch != "interp":          # time candidates on the first chunk (scratch)
        cfg = configs.pick("logits_bwd", fam, (H, V, n.bit_length(), str(hidden.dtype), cv), bench=lambda c: (
            dlogits_chunk(hidden, weight, bias, targets, lse, ent, g_logp, g_ent, temperature, 0,
                          min(V, cv), dz, arch, c)))
    bn, bv = cfg.blocks["BLOCK_N"], cfg.blocks["BLOCK_V"]
    # [token tiles, vocab tiles of a chunk] int8: 0 = the block's dz was dropped (filtering only)
    flags = torch.empty(triton.cdiv(n, bn), triton.cdiv(cv, bv), device=dev, dtype=torch.int8) if eps else None
    if configs.grad_gemm(dev, hidden.dtype, filtering=eps is not None) == "cublas":
        def mm(a, b, c, accumulate, f=None, fblock=None):        # cuBLAS multiplies the dropped zeros too
            return torch_mm_into(a, b, c, accumulate)
    else:
        def mm(a, b, c, accumulate, f=None, fblock=(1, 1)):
            return matmul_into(a, b, c, accumulate=accumulate, arch=arch, flags=f, flag_block=fblock)
    for i, v0 in enumerate(range(0, V, cv)):
        v1 = min(V, v0 + cv)
        f = flags[:, : triton.cdiv(v1 - v0, bv)] if eps else None
        dlogits_chunk(hidden, weight, bias, targets, lse, ent, g_logp, g_ent, temperature, v0, v1, dz, arch, cfg,
                      flags=f, filter_eps=eps or 0.0)
        d = dz[:, : v1 - v0]                                     # [n, chunk]
        if need_h:                                               # M = tokens, K = vocab
            mm(d, weight[v0:v1], gh, accumulate=i > 0, f=f, fblock=(bn, bv))
        if need_w:                                               # M = vocab, K = tokens
            mm(d.t(), hidden, gw[v0:v1], accumulate=False, f=None if f is None else f.t(), fblock=(bv, bn))
        if need_b:
            gb[v0:v1] = d.sum(0, dtype=torch.float32)
    return (gh.to(hidden.dtype) if need_h else None, gw, gb.to(bias.dtype) if need_b else None)
