"""Forward logits tiles on chip: split-vocab online softmax statistics, then the merge of the splits.
(The backward dlogits kernel is kernels/dlogits.py; both build their logits tiles with kernels/_tiles.py.)

Plain PyTorch equivalent (z = logits / temperature, never materialised here in the forward):
    z = (hidden.float() @ weight.float().T + bias) / temperature                   # [n, V]
    forward:  lse = z.logsumexp(-1); logp = z.gather(-1, targets) - lse; ent = lse - (softmax(z) * z).sum(-1)

Block decomposition (program = one BLOCK_N token tile x one contiguous range of BLOCK_V vocab tiles):
    for v0 in vocab range of this program (V / n_splits columns):
        acc[BLOCK_N, BLOCK_V] = 0 (fp32, registers)
        for k0 in 0..H step BLOCK_H:                            # pipelined (num_stages) through shared memory
            acc += tl.dot(hidden[rows, k0:k0+BH], weight[cols, k0:k0+BH].T)   # bf16/fp16 operands, fp32 acc
        z = (acc + bias[cols]) * inv_temperature                # stays on chip
        online max m, sum-exp s, sum exp*(z-m) t (entropy), target logit x -> per-split partials [S, n]
    merge kernel: lse = logsumexp over splits; logp = x - lse; entropy = log(s) - t / s
Programs are ordered in groups of GROUP_N token tiles x all vocab splits so that the programs resident at the
same time share hidden and weight tiles through L2 (about GROUP_N + n_resident/GROUP_N distinct tiles).

Flops and bytes (n tokens, H hidden, V vocab, 2-byte operands): forward 2*n*H*V flops; HBM bytes ~ 2*V*H*ceil(n
/ (BLOCK_N*GROUP_N)) + 2*n*H + 16*n*S (partials) + 12*n (logp, lse, entropy) -- nothing of size n x V.
Intensity of one 128x128 tile step from L2: 2*128*128*64 flops per
2*(128+128)*64 bytes = 64 flop/byte; the GROUP_N ordering keeps HBM traffic far below the H100 ridge point
(989 TFLOP/s / 3.35 TB/s = 295 flop/byte) at large n.
"""
from __future__ import annotations

import torch

from ._runtime import interpreting, num_sms, tl, triton
from ._tiles import logits_tile, swizzle, token_tile
from . import configs


# n_tokens and the split plan vary per batch and are not specialised; hidden_size and vocab_size are
# (divisible by 16 or not), which keeps the weight loads vectorised.
@triton.jit(do_not_specialize=["n_tokens", "tiles_per_split", "n_splits"])
def _logits_fwd_kernel(
    # pointers
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr,          # [n, H], [V, H], [V], [n] int64
    m_ptr, s_ptr, t_ptr, x_ptr,                             # per-split partials, each [n_splits, n] fp32
    # shapes
    n_tokens, hidden_size, vocab_size, tiles_per_split, n_splits,
    # strides
    stride_hn, stride_hh, stride_wv, stride_wh,
    # scalars
    inv_temperature,
    # meta: feature flags then block sizes
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, DOT_FP32: tl.constexpr, DOT_IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
    FLATTEN: tl.constexpr,
):
    tok_tile, split = swizzle(tl.program_id(0), tl.cdiv(n_tokens, BLOCK_N), n_splits, GROUP_N)
    row0, r_loc, row_ok, r_ld = token_tile(tok_tile, n_tokens, BLOCK_N)
    # Scalar tile bases in int64, in-tile offsets in int32 (validate_linear keeps every span < 2**31 elements)
    h_base = hidden_ptr + row0.to(tl.int64) * stride_hn
    tgt = tl.load(targets_ptr + row0 + r_ld).to(tl.int32)    # [BN]
    v_lo = split * tiles_per_split * BLOCK_V
    v_hi = tl.minimum(v_lo + tiles_per_split * BLOCK_V, vocab_size)
    k_loc = tl.arange(0, BLOCK_H)                               # [BH]
    c_loc = tl.arange(0, BLOCK_V)                               # [BV]
    h_off = r_ld[:, None] * stride_hn + k_loc[None, :] * stride_hh          # [BN, BH] int32, loop-invariant
    w_off = c_loc[None, :] * stride_wv + k_loc[:, None] * stride_wh         # [BH, BV] int32, loop-invariant
    w_base = weight_ptr + v_lo.to(tl.int64) * stride_wv

    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    t = tl.zeros([BLOCK_N], tl.float32)
    x = tl.zeros([BLOCK_N], tl.float32)
    for v0 in tl.range(v_lo, v_hi, BLOCK_V, flatten=FLATTEN):   # FLATTEN: one pipeline over (vocab tile, K)
        cols = v0 + c_loc
        col_ok = cols < v_hi
        z = logits_tile(h_base, h_off, w_base, w_off, bias_ptr, cols, col_ok, hidden_size, stride_hh, stride_wh,
                        inv_temperature, HAS_BIAS, DOT_FP32, DOT_IEEE, BLOCK_N, BLOCK_V, BLOCK_H)   # [BN, BV]
        m_new = tl.maximum(m, tl.max(z, 1))
        # flash-attention's guard: a row whose logits so far are all -inf (masked vocabulary) keeps m = -inf
        # and uses 0 as the reference, never -inf - -inf
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        e = tl.exp(z - m_safe[:, None])
        if WITH_ENTROPY:  # t = sum e*(z - m), relative to the running max: entropy = log(s) - t/s, no cancellation
            t = (alpha * (t + tl.where(s > 0, s * (m - m_new), 0.0))
                 + tl.sum(tl.where(e > 0, e * (z - m_safe[:, None]), 0.0), 1))
        s = s * alpha + tl.sum(e, 1)
        x += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), 1)
        m = m_new
        w_base += BLOCK_V * stride_wv

    part = split.to(tl.int64) * n_tokens + row0 + r_loc
    tl.store(m_ptr + part, m, mask=row_ok)
    tl.store(s_ptr + part, s, mask=row_ok)
    tl.store(x_ptr + part, x, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(t_ptr + part, t, mask=row_ok)


@triton.jit(do_not_specialize=["n_tokens", "n_splits"])
def _merge_kernel(
    # pointers
    m_ptr, s_ptr, t_ptr, x_ptr,            # partials [n_splits, n] fp32
    logp_ptr, lse_ptr, ent_ptr,            # outputs [n] fp32
    # shapes
    n_tokens, n_splits,
    # meta
    WITH_ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < n_tokens
    mx = tl.full([BLOCK], float("-inf"), tl.float32)
    sm = tl.zeros([BLOCK], tl.float32)
    tz = tl.zeros([BLOCK], tl.float32)
    xt = tl.zeros([BLOCK], tl.float32)
    off = rows                             # split j's row r at j * n + r, advanced through 64-bit pointers
    for j in range(0, n_splits):
        mj = tl.load(m_ptr + off, mask=ok, other=0.0)
        m_new = tl.maximum(mx, mj)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)     # splits whose vocabulary is all -inf
        a = tl.exp(mx - m_safe)
        b = tl.exp(mj - m_safe)
        sj = tl.load(s_ptr + off, mask=ok, other=0.0)
        if WITH_ENTROPY:  # partials are relative to their own max m_j; re-base to m_new (0 for empty sums)
            tj = tl.load(t_ptr + off, mask=ok, other=0.0)
            tz = (a * (tz + tl.where(sm > 0, sm * (mx - m_new), 0.0))
                  + b * (tj + tl.where(sj > 0, sj * (mj - m_new), 0.0)))
        sm = sm * a + sj * b
        xt += tl.load(x_ptr + off, mask=ok, other=0.0)
        mx = m_new
        m_ptr += n_tokens
        s_ptr += n_tokens
        t_ptr += n_tokens
        x_ptr += n_tokens
    lse = mx + tl.log(sm)
    tl.store(lse_ptr + rows, lse, mask=ok)
    tl.store(logp_ptr + rows, xt - lse, mask=ok)
    if WITH_ENTROPY:
        tl.store(ent_ptr + rows, tl.log(sm) - tz / sm, mask=ok)


# ----------------------------------------------------------------------------------------------- launchers
def dot_flags(*dtypes: torch.dtype) -> dict:
    """DOT_FP32: upcast dot operands (always under the interpreter, whose bf16 dot is wrong; mixed dtypes; fp32).
    DOT_IEEE: exact fp32 products (configs.ieee_dots); otherwise fp32 operands are rounded to TF32 on the tensor cores."""
    mixed = len(set(dtypes)) > 1
    fp32_in = all(d == torch.float32 for d in dtypes)
    return {"DOT_FP32": interpreting() or mixed or fp32_in, "DOT_IEEE": configs.ieee_dots(*dtypes)}


def _split_plan(n_tiles: int, n_vtiles: int, device: torch.device) -> tuple[int, int]:
    """(tiles_per_split, n_splits) so that n_tiles * n_splits programs fill the GPU; no empty split."""
    want = max(1, -(-configs.PROGRAMS_PER_SM * num_sms(device) // n_tiles))
    n_splits = min(n_vtiles, want)
    tiles_per_split = -(-n_vtiles // n_splits)
    return tiles_per_split, -(-n_vtiles // tiles_per_split)


def logits_stats(hidden, weight, bias, targets, temperature: float, with_entropy: bool, arch: str):
    """Forward: per-token (logp, lse, entropy or None), all float32 [n]. Tensors are already validated."""
    n, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    logp = torch.empty(n, device=dev, dtype=torch.float32)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if with_entropy else None
    if n == 0:
        return logp, lse, ent
    flags = dot_flags(hidden.dtype, weight.dtype)
    fam = configs.family("logits_fwd", arch, hidden.dtype)

    def launch(c):  # one forward pass with config c; returns the per-split partials
        n_tiles = triton.cdiv(n, c.blocks["BLOCK_N"])
        tps, n_splits = _split_plan(n_tiles, triton.cdiv(V, c.blocks["BLOCK_V"]), dev)
        parts = torch.empty(4 if with_entropy else 3, n_splits, n, device=dev, dtype=torch.float32)
        t_part = parts[3] if with_entropy else parts[0]
        _logits_fwd_kernel[(n_tiles * n_splits,)](
            hidden, weight, bias if bias is not None else hidden, targets,
            parts[0], parts[1], t_part, parts[2],
            n, H, V, tps, n_splits,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            1.0 / temperature,
            HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, **flags, **c.meta(hidden.dtype == torch.float32))
        return parts, t_part, n_splits

    cfg = configs.pick("logits_fwd", fam, (H, V, n.bit_length(), str(hidden.dtype)), bench=launch)
    parts, t_part, n_splits = launch(cfg)
    mcfg = configs.pick("merge", arch)
    _merge_kernel[(triton.cdiv(n, mcfg.blocks["BLOCK"]),)](
        parts[0], parts[1], t_part, parts[2], logp, lse, ent if ent is not None else lse,
        n, n_splits, WITH_ENTROPY=with_entropy, **mcfg.meta())
    return logp, lse, ent
