"""Shared @triton.jit device helpers of the logits and matmul kernels (inlined into each kernel).

- swizzle: program id -> (row tile, column tile) in groups of GROUP row tiles x all column tiles, so that the
  programs resident at the same time share their row and column operands through L2.
- dot_acc: acc += a @ b in fp32, with the operands upcast (DOT_FP32: the interpreter, whose bf16 dot is wrong,
  and mixed/fp32 inputs) and exact fp32 products (DOT_IEEE: fp32 inputs, no TF32).
- token_tile / logits_tile: the rows of one BLOCK_N token tile, and its [BLOCK_N, BLOCK_V] logits tile
  z = (h[rows] @ W[cols].T + b[cols]) * inv_temperature, -inf on padded columns (kernels/logits.py, dlogits.py).
"""
from __future__ import annotations

from ._runtime import tl, triton


@triton.jit
def swizzle(pid, n_row_tiles, n_col_tiles, GROUP: tl.constexpr):
    per_group = GROUP * n_col_tiles
    first = (pid // per_group) * GROUP
    group_rows = tl.minimum(n_row_tiles - first, GROUP)
    row_tile = first + (pid % per_group) % group_rows
    col_tile = (pid % per_group) // group_rows
    return row_tile, col_tile


@triton.jit
def dot_acc(a, b, acc, DOT_FP32: tl.constexpr, DOT_IEEE: tl.constexpr):
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if DOT_IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def token_tile(tok_tile, n_tokens, BLOCK_N: tl.constexpr):
    """(row0, r_loc [BN], row_ok [BN], r_ld [BN]): padded rows load the last valid row (never stored)."""
    r_loc = tl.arange(0, BLOCK_N)
    row0 = tok_tile * BLOCK_N
    rows = row0 + r_loc
    r_ld = tl.minimum(rows, n_tokens - 1) - row0
    return row0, r_loc, rows < n_tokens, r_ld


@triton.jit
def logits_tile(h_base, h_off, w_base, w_off, bias_ptr, cols, col_ok, hidden_size, stride_hh, stride_wh,
                inv_temperature, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, DOT_IEEE: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """z [BN, BV] fp32 from the tile bases (int64 scalars) and in-tile offsets h_off [BN, BH], w_off [BH, BV]."""
    k_loc = tl.arange(0, BLOCK_H)
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for k0 in range(0, hidden_size, BLOCK_H):                   # pipelined (num_stages) through shared memory
        k_ok = k_loc < hidden_size - k0
        h = tl.load(h_base + k0 * stride_hh + h_off, mask=k_ok[None, :], other=0.0)                   # [BN, BH]
        w = tl.load(w_base + k0 * stride_wh + w_off, mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # [BH, BV]
        acc = dot_acc(h, w, acc, DOT_FP32, DOT_IEEE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]   # contiguous [V]
    return tl.where(col_ok[None, :], acc * inv_temperature, float("-inf"))
