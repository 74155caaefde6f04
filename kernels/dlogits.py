"""Backward logits tiles: dloss/dlogits of one vocab chunk, recomputing the logits on chip.

Plain PyTorch equivalent (z = (hidden.float() @ weight.float().T + bias) / T for the chunk's columns):
    p = exp(z - lse[:, None])
    dz = (g_logp[:, None] * (onehot(targets) - p) - g_ent[:, None] * p * (z - lse + ent)[:, None]) / T  # [n, chunk]

Block decomposition (program = one BLOCK_N token tile x one BLOCK_V vocab tile of the chunk, ordered in groups
of GROUP_N token tiles x all the chunk's vocab tiles, kernels/_tiles.py swizzle):
    z[BN, BV] = logits_tile(...)                   # H / BLOCK_H pipelined tl.dot steps, fp32 accumulator
    dz = (g_l * (hit - p) - g_e * where(p > 0, p * (z - lse + ent), 0)) / T      # 0 * -inf guarded
    FILTER: keep = any row with max |dz| > eps * (|g_l| + |g_e|) / T; dz *= keep; flags[tile] = keep
    dz -> dlogits chunk buffer [n, chunk] (bf16 for bf16 inputs, else fp32)
Flops 2*n*H*chunk per chunk; bytes: hidden and weight tiles through L2 as in the forward, plus n*chunk*elt of
dz written (the buffer is bounded by configs.DLOGITS_BUDGET_BYTES and n * chunk < 2**31).
"""
from __future__ import annotations

import torch

from ._runtime import tl, triton
from ._tiles import logits_tile, swizzle, token_tile
from . import configs
from .logits import dot_flags


# n_tokens varies per batch and is not specialised; hidden_size and the chunk bounds are (divisible by 16 or
# not): unspecialised chunk bounds made the dz stores scalar (255 registers, spills).
@triton.jit(do_not_specialize=["n_tokens", "n_vtiles"])
def _dlogits_kernel(
    # pointers
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr,          # [n, H], [V, H], [V], [n] int64
    lse_ptr, ent_ptr, glogp_ptr, gent_ptr,                  # [n] fp32 each
    dz_ptr, flags_ptr,                                      # dlogits chunk [n, chunk] (unit column stride),
                                                            # FILTER: flags [n_tiles, n_vtiles] int8
    # shapes
    n_tokens, hidden_size, vocab_begin, vocab_end, n_vtiles,
    # strides
    stride_hn, stride_hh, stride_wv, stride_wh, stride_dzn, stride_fn,
    # scalars
    inv_temperature, filter_eps,
    # meta: feature flags then block sizes
    HAS_BIAS: tl.constexpr, HAS_GRAD_ENT: tl.constexpr, FILTER: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
):
    tok_tile, vt = swizzle(tl.program_id(0), tl.cdiv(n_tokens, BLOCK_N), n_vtiles, GROUP_N)
    row0, r_loc, row_ok, r_ld = token_tile(tok_tile, n_tokens, BLOCK_N)
    h_base = hidden_ptr + row0.to(tl.int64) * stride_hn         # int64 scalar bases, int32 in-tile offsets
    v0 = vocab_begin + vt * BLOCK_V
    w_base = weight_ptr + v0.to(tl.int64) * stride_wv
    k_loc = tl.arange(0, BLOCK_H)
    c_loc = tl.arange(0, BLOCK_V)
    cols = v0 + c_loc
    col_ok = cols < vocab_end
    h_off = r_ld[:, None] * stride_hn + k_loc[None, :] * stride_hh          # [BN, BH]
    w_off = c_loc[None, :] * stride_wv + k_loc[:, None] * stride_wh         # [BH, BV]
    z = logits_tile(h_base, h_off, w_base, w_off, bias_ptr, cols, col_ok, hidden_size, stride_hh, stride_wh,
                    inv_temperature, HAS_BIAS, DOT_FP32, DOT_IEEE, BLOCK_N, BLOCK_V, BLOCK_H)   # [BN, BV]

    tgt = tl.load(targets_ptr + row0 + r_ld).to(tl.int32)    # [BN]
    lse = tl.load(lse_ptr + row0 + r_ld)
    g_l = tl.load(glogp_ptr + row0 + r_ld)
    p = tl.exp(z - lse[:, None])                               # softmax, 0 on padded and -inf columns
    dz = -p * g_l[:, None]
    if HAS_GRAD_ENT:  # p * (log p + entropy); 0 where p = 0 (z = -inf would give 0 * -inf)
        ent = tl.load(ent_ptr + row0 + r_ld)
        g_e = tl.load(gent_ptr + row0 + r_ld)
        dz -= g_e[:, None] * tl.where(p > 0, p * (z - lse[:, None] + ent[:, None]), 0.0)
    dz = tl.where(cols[None, :] == tgt[:, None], dz + g_l[:, None], dz) * inv_temperature
    if FILTER:  # kernels/grad_filter.py: drop the tile if every |dz| <= eps * (|g_logp| + |g_ent|) / T
        u = tl.abs(g_l)
        if HAS_GRAD_ENT:
            u += tl.abs(g_e)
        # padded columns hold dz = 0 and padded rows repeat row n-1: neither changes the decision
        row_big = tl.max(tl.abs(dz), 1) > (filter_eps * inv_temperature) * u       # [BN]
        keep = tl.max(row_big.to(tl.int32), 0)                                     # 0 or 1
        dz = tl.where(keep > 0, dz, 0.0)
        tl.store(flags_ptr + tok_tile * stride_fn + vt, keep.to(tl.int8))
    out = dz_ptr + row0.to(tl.int64) * stride_dzn + vt * BLOCK_V + r_loc[:, None] * stride_dzn + c_loc[None, :]
    tl.store(out, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def dlogits_chunk(hidden, weight, bias, targets, lse, ent, g_logp, g_ent, temperature: float,
                  v_begin: int, v_end: int, out: torch.Tensor, arch: str, cfg=None, flags=None,
                  filter_eps: float = 0.0):
    """Backward: write dloss/dlogits for vocab columns [v_begin, v_end) into out[:, :v_end - v_begin].
    With flags ([token tiles, vocab tiles of the chunk] int8), gradient filtering: tiles whose every |dz| is
    <= filter_eps * (|g_logp| + |g_ent|) / T are written as 0 and flagged 0 (kernels/grad_filter.py)."""
    n, H = hidden.shape
    cfg = cfg or configs.pick("logits_bwd", configs.family("logits_bwd", arch, hidden.dtype))
    bn, bv = cfg.blocks["BLOCK_N"], cfg.blocks["BLOCK_V"]
    n_tiles, n_vt = triton.cdiv(n, bn), triton.cdiv(v_end - v_begin, bv)
    has_ge = g_ent is not None
    if out.stride(1) != 1:
        raise ValueError("dlogits_chunk: out must have unit column stride")
    _dlogits_kernel[(n_tiles * n_vt,)](
        hidden, weight, bias if bias is not None else hidden, targets,
        lse, ent if has_ge else lse, g_logp, g_ent if has_ge else g_logp, out, flags if flags is not None else out,
        n, H, v_begin, v_end, n_vt,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), out.stride(0),
        flags.stride(0) if flags is not None else 0,
        1.0 / temperature, float(filter_eps),
        HAS_BIAS=bias is not None, HAS_GRAD_ENT=has_ge, FILTER=flags is not None,
        **dot_flags(hidden.dtype, weight.dtype), **cfg.meta(hidden.dtype == torch.float32))
