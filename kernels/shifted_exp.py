"""Row softmax of cuBLAS logits for the single-pass backend (backend="cublas", fastpmd/single_pass.py): per row
the target's log-prob and the unnormalised gradient operand E, from one read of the fp32 logits.

Plain PyTorch equivalent (raw [n, V] fp32 from a cuBLAS GEMM, z = (raw + bias) * inv_temperature):
    shift = z[target]            (z.max(-1) instead for a row where z.max(-1) - z[target] > SHIFT_LIMIT)
    e = exp(z - shift);  rest = e.sum(-1) - e[target];  s = rest + e[target]
    logp = z[target] - shift - log(s)                   # = -log1p(rest) when shift = z[target]
    E = e, with E[target] = -rest                       # in the gradient GEMMs' dtype
    inv_s = 1 / s
so that  onehot(target) - softmax(z) = -inv_s[:, None] * E  exactly: the gradient GEMMs read E and a per-row
scale, nothing normalises E in a second pass, and the target's 1 - p = rest / s never cancels (no 1 - p
rounding for confident tokens).

Block decomposition (program = one row): loop over the row in BLOCK_V tiles: load z (fp32), e = exp(z - z_t),
store e (the target's entry is rewritten with -rest after a CTA barrier), accumulate rest and the row
max. Only when the row max exceeds z_t + SHIFT_LIMIT (the target's log-prob is below about -SHIFT_LIMIT, so e
or rest could leave E's range or make the row scale underflow) a second loop rewrites the row with shift =
row max. Bytes per logit: 4 read +
2 (bf16 E) or 4 (fp32 E) written; the rare second loop repeats that for its row. ~5 flops per logit: memory-
bound (PREDICTED on an H100 at 2.85 TB/s: 2.1 ms per 10^9 logits with bf16 E).
"""
from __future__ import annotations

import torch

from ._runtime import arch_of, on_device, tl, triton
from . import configs

SHIFT_LIMIT = 30.0   # e <= exp(30) ~ 1e13 and rest <= V * 1e13: inside bf16/fp32 range, 1/s far from underflow


@triton.jit
def _log1p(x):
    """log(1 + x) for x >= 0 without the rounding of 1 + x at small x (series below 1e-3: error < x^4/4)."""
    return tl.where(x < 1e-3, x * (1.0 - x * (0.5 - x / 3.0)), tl.log(1.0 + x))


@triton.jit
def _exp_pass(z_row, e_row, bias_ptr, tgt, shift, vocab_size, inv_temperature,
              HAS_BIAS: tl.constexpr, BLOCK_V: tl.constexpr):
    """One sweep of a row: store exp(z - shift); return (sum without the target column, max z)."""
    cols = tl.arange(0, BLOCK_V)
    acc = tl.zeros([BLOCK_V], tl.float32)
    zmax = tl.full([BLOCK_V], float("-inf"), tl.float32)
    for v0 in range(0, vocab_size, BLOCK_V):
        c = v0 + cols
        ok = c < vocab_size
        z = tl.load(z_row + c, mask=ok, other=float("-inf"))
        if HAS_BIAS:
            z += tl.load(bias_ptr + c, mask=ok, other=0.0).to(tl.float32)
        z = z * inv_temperature
        e = tl.exp(z - shift)
        tl.store(e_row + c, e.to(e_row.dtype.element_ty), mask=ok)   # the target's entry is rewritten last
        acc += tl.where(c != tgt, e, 0.0)          # masked columns: exp(-inf) = 0
        zmax = tl.maximum(zmax, z)
    return tl.sum(acc, 0), tl.max(zmax, 0)


# n_rows varies per call and is not specialised; vocab_size and the strides are (divisible by 16 or not)
@triton.jit(do_not_specialize=["n_rows"])
def _shifted_exp_kernel(
    # pointers
    z_ptr, bias_ptr, targets_ptr,             # raw logits [n, V] fp32 (unit column stride), [V], [n] int64
    e_ptr, logp_ptr, inv_s_ptr,               # outputs: E [n, V] (unit column stride), [n] fp32, [n] fp32
    # shapes
    n_rows, vocab_size,
    # strides
    stride_zn, stride_en,
    # scalars
    inv_temperature,
    # meta
    HAS_BIAS: tl.constexpr, SHIFT_LIM: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_zn
    e_row = e_ptr + row * stride_en
    tgt = tl.load(targets_ptr + row).to(tl.int32)
    z_t = tl.load(z_row + tgt)
    if HAS_BIAS:
        z_t += tl.load(bias_ptr + tgt).to(tl.float32)
    z_t = z_t * inv_temperature
    rest, zmax = _exp_pass(z_row, e_row, bias_ptr, tgt, z_t, vocab_size, inv_temperature, HAS_BIAS, BLOCK_V)
    shift = z_t
    if zmax - z_t > SHIFT_LIM:                     # rare: rewrite the row relative to its max
        shift = zmax
        rest, zmax = _exp_pass(z_row, e_row, bias_ptr, tgt, zmax, vocab_size, inv_temperature, HAS_BIAS,
                               BLOCK_V)
    e_t = tl.exp(z_t - shift)
    s = rest + e_t
    logp = tl.where(shift == z_t, -_log1p(rest), (z_t - shift) - tl.log(s))
    tl.debug_barrier()                             # every thread's tile stores land before the target's entry
    tl.store(e_row + tgt, (-rest).to(e_ptr.dtype.element_ty))
    tl.store(logp_ptr + row, logp)
    tl.store(inv_s_ptr + row, 1.0 / s)


def shifted_exp(raw: torch.Tensor,  # [n, V] fp32, unit column stride
                bias: torch.Tensor | None,  # [V]
                targets: torch.Tensor,  # [n] int64
                inv_temperature: float,
                e_out: torch.Tensor):  # [n, V] bf16 or fp32, unit column stride (written)
    """(logp [n] fp32, inv_s [n] fp32) and E in e_out; see the module docstring. No host sync."""
    n, V = raw.shape
    logp = torch.empty(n, device=raw.device, dtype=torch.float32)
    inv_s = torch.empty(n, device=raw.device, dtype=torch.float32)
    if n == 0:
        return logp, inv_s
    cfg = configs.pick("shifted_exp", arch_of(raw.device))
    with on_device(raw.device):
        _shifted_exp_kernel[(n,)](raw, raw if bias is None else bias, targets, e_out, logp, inv_s, n, V,
                                  raw.stride(0), e_out.stride(0), float(inv_temperature),
                                  HAS_BIAS=bias is not None, SHIFT_LIM=SHIFT_LIMIT, **cfg.meta())
    return logp, inv_s
