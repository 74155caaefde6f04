"""Tiled matmul with fp32 accumulation, used by the backward pass to turn dlogits chunks into gradients.

Plain PyTorch equivalent:  c = a.float() @ b.float()   (ACCUMULATE: c += a @ b), result cast to c.dtype.

Block decomposition (program = one BLOCK_M x BLOCK_N tile of c, programs ordered in groups of GROUP_M tile rows
so that concurrently resident programs share A rows and B columns through L2):
    acc[BLOCK_M, BLOCK_N] = 0 (fp32 registers)
    for k0 in 0..K step BLOCK_K:                  # pipelined through shared memory (num_stages)
        if FILTER and every flag of a[rows, k0:k0+BK] is 0: continue      # gradient filtering (opt-in)
        acc += tl.dot(a[rows, k0:k0+BK], b[k0:k0+BK, cols])   # bf16/fp16 operands -> HGMMA (sm_90) / HMMA (sm_80)
    c[rows, cols] = acc (+ c[rows, cols] when ACCUMULATE)
Any strides: the backward passes dlogits^T (a column-major view) for grad_weight without a copy.

Flops 2*M*N*K; bytes 2*(M*K*ceil(N/BN) + K*N*ceil(M/BM)) / L2-reuse + M*N*c_bytes (x2 with ACCUMULATE).
In the backward: grad_hidden chunk  M=n, N=H, K=chunk_v (fp32 c, ACCUMULATE after the first chunk);
                 grad_weight chunk  M=chunk_v, N=H, K=n (c = the grad_weight rows, written once; the fp32
                 accumulation over all n tokens happens in registers).
"""
from __future__ import annotations

import torch

from . import _runtime
from ._runtime import max_offset, tl, triton
from ._tiles import dot_acc, swizzle
from . import configs
from .logits import dot_flags


@triton.jit  # M, N, K stay specialised (divisible by 16 or not): it keeps loads vectorised; <= 8 variants
def _matmul_kernel(
    # pointers
    a_ptr, b_ptr, c_ptr,                  # a [M, K], b [K, N], c [M, N]
    flags_ptr,                            # FILTER: [ceil(M / FLAG_M), ceil(K / FLAG_K)] int8, 0 = skip block
    # shapes
    M, N, K, flag_rows, flag_cols,
    # strides
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_fm, stride_fk,
    # meta
    ACCUMULATE: tl.constexpr, DOT_FP32: tl.constexpr, DOT_IEEE: tl.constexpr,
    FILTER: tl.constexpr, FLAG_M: tl.constexpr, FLAG_K: tl.constexpr, FLAG_RM: tl.constexpr, FLAG_RK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    rm = m0 + tl.arange(0, BLOCK_M)                                 # [BM]
    rn = n0 + tl.arange(0, BLOCK_N)                                 # [BN]
    rk = tl.arange(0, BLOCK_K)                                      # [BK]
    # Padded rows/columns wrap around (no load masks along M, N; masked at the store): `% M` keeps the
    # compiler's contiguity information (tl.minimum loses it: scalar loads, no cp.async pipelining). Scalar tile
    # bases in int64, in-tile offsets in int32 (matmul_into checks every operand's span < 2**31 elements).
    a_ptrs = (a_ptr + m0.to(tl.int64) * stride_am
              + ((rm % M) - m0)[:, None] * stride_am + rk[None, :] * stride_ak)     # [BM, BK]
    b_ptrs = (b_ptr + n0.to(tl.int64) * stride_bn
              + rk[:, None] * stride_bk + ((rn % N) - n0)[None, :] * stride_bn)     # [BK, BN]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if FILTER:  # gradient filtering: skip the K-step when every flag block it touches is 0
            fr = m0 // FLAG_M + tl.arange(0, FLAG_RM)            # the FLAG_RM x FLAG_RK flags this step touches
            fk = k0 // FLAG_K + tl.arange(0, FLAG_RK)
            f = tl.load(flags_ptr + fr[:, None] * stride_fm + fk[None, :] * stride_fk,
                        mask=(fr < flag_rows)[:, None] & (fk < flag_cols)[None, :], other=0)
            run = tl.max(tl.max(f.to(tl.int32), 1), 0) > 0
        else:
            run = True
        if run:
            k_ok = rk < K - k0
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
            acc = dot_acc(a, b, acc, DOT_FP32, DOT_IEEE)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = (c_ptr + m0.to(tl.int64) * stride_cm + n0.to(tl.int64) * stride_cn
              + (rm - m0)[:, None] * stride_cm + (rn - n0)[None, :] * stride_cn)
    c_ok = (rm < M)[:, None] & (rn < N)[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_ok, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_ok)


def matmul_into(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, accumulate: bool, arch: str, flags=None,
                flag_block: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """c (+)= a @ b with fp32 accumulation; a [M, K], b [K, N], c [M, N] (any strides). fp32 x fp32 is exact
    (no TF32); fp32 x fp16 (the fp16 path's fp32 dlogits) runs as TF32 on the GPU.
    flags [ceil(M / fm), ceil(K / fk)] (int8, any strides) with flag_block = (fm, fk), powers of two, mark the
    blocks of `a` that are zero (flag 0; gradient filtering, kernels/grad_filter.py): a K-step whose flags are
    all 0 is skipped (its loads and dot), so flag blocks at least the tile size skip every dropped block."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return c
    if K == 0:
        if not accumulate:
            c.zero_()
        return c
    for name, t in (("a", a), ("b", b), ("c", c)):
        if max_offset(t) >= _runtime.INDEX_LIMIT:
            raise ValueError(f"matmul_into: operand {name} {tuple(t.shape)} spans {max_offset(t) + 1} elements "
                             f"(32-bit offsets need < {_runtime.INDEX_LIMIT})")
    dflags = dot_flags(a.dtype, b.dtype)
    f = flags
    f_shape = tuple(f.shape) if f is not None else (0, 0)
    f_strides = tuple(f.stride()) if f is not None else (0, 0)

    def launch(cfg, out):
        grid = (triton.cdiv(M, cfg.blocks["BLOCK_M"]) * triton.cdiv(N, cfg.blocks["BLOCK_N"]),)
        _matmul_kernel[grid](a, b, out, f if f is not None else out, M, N, K, *f_shape,
                             a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
                             *f_strides, ACCUMULATE=accumulate and out is c, **dflags, FILTER=f is not None,
                             FLAG_M=flag_block[0], FLAG_K=flag_block[1],
                             FLAG_RM=max(1, cfg.blocks["BLOCK_M"] // flag_block[0]),
                             FLAG_RK=max(1, cfg.blocks["BLOCK_K"] // flag_block[1]),
                             **cfg.meta(torch.float32 in (a.dtype, b.dtype)))

    fam = configs.family("matmul", arch, b.dtype)      # b: the input operand (a is fp32 dlogits on the fp16 path)
    if configs.autotune_enabled() and arch != "interp":
        scratch = torch.empty_like(c)  # autotuning must not touch the accumulator
        cfg = configs.pick("matmul", fam, (M.bit_length(), N, K.bit_length(), str(a.dtype), a.stride(0) == 1),
                           bench=lambda cf: launch(cf, scratch))
    else:
        cfg = configs.pick("matmul", fam)
    launch(cfg, c)
    return c
