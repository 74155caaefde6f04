"""Logits tiles on chip: forward softmax statistics and backward dlogits, one kernel behind a BACKWARD flag.

Plain PyTorch equivalent (z = logits / temperature, never materialised here in the forward):
    z = (hidden.float() @ weight.float().T + bias) / temperature                   # [n, V]
    forward:  lse = z.logsumexp(-1); logp = z.gather(-1, targets) - lse; ent = lse - (softmax(z) * z).sum(-1)
    backward: dz = (g_logp * (onehot - p) - g_ent * p * (z - lse + ent)) / temperature  for columns of one chunk

Block decomposition (program = one BLOCK_N token tile x one contiguous range of BLOCK_V vocab tiles):
    for v0 in vocab range of this program:                      # forward: V / n_splits; backward: one tile
        acc[BLOCK_N, BLOCK_V] = 0 (fp32, registers)
        for k0 in 0..H step BLOCK_H:                            # pipelined (num_stages) through shared memory
            acc += tl.dot(hidden[rows, k0:k0+BH], weight[cols, k0:k0+BH].T)   # bf16/fp16 operands, fp32 acc
        z = (acc + bias[cols]) * inv_temperature                # stays on chip
        forward:  online max m, sum-exp s, sum exp*(z-m) t (entropy), target logit x -> per-split partials [S, n]
        backward: dz tile -> dlogits chunk buffer [n, chunk_v] (operand dtype; fp32 for fp16/fp32 inputs)
    merge kernel (forward only): lse = logsumexp over splits; logp = x - lse; entropy = log(s) - t / s
Programs are ordered in groups of GROUP_N token tiles x all vocab splits so that the programs resident at the
same time share hidden and weight tiles through L2 (about GROUP_N + n_resident/GROUP_N distinct tiles).

Flops and bytes (n tokens, H hidden, V vocab, 2-byte operands): forward 2*n*H*V flops; HBM bytes ~ 2*V*H*ceil(n
/ (BLOCK_N*GROUP_N)) + 2*n*H + 16*n*S (partials) + 12*n (logp, lse, entropy) -- nothing of size n x V.
Backward dlogits: the same 2*n*H*V flops per pass plus 2*n*V bytes written to the chunk buffers (bounded to
configs.DLOGITS_BUDGET_BYTES at a time). Intensity of one 128x128 tile step from L2: 2*128*128*64 flops per
2*(128+128)*64 bytes = 64 flop/byte; the GROUP_N ordering keeps HBM traffic far below the H100 ridge point
(989 TFLOP/s / 3.35 TB/s = 295 flop/byte) at large n.
"""
from __future__ import annotations

import torch

from ._runtime import interpreting, kernel, num_sms, tl, triton
from . import configs


# n_tokens and the split plan vary per batch and are not specialised; hidden_size and the vocab chunk bounds are
# (divisible by 16 or not), which keeps the weight loads and dlogits stores vectorised.
@kernel(do_not_specialize=["n_tokens", "tiles_per_split", "n_splits"])
def _logits_tile_kernel(
    # pointers
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr,          # [n, H], [V, H], [V], [n] int64
    m_ptr, s_ptr, t_ptr, x_ptr,                             # forward partials, each [n_splits, n] fp32
    lse_ptr, ent_ptr, glogp_ptr, gent_ptr, dz_ptr,          # backward: [n] fp32 x4, dlogits chunk [n, chunk]
    flags_ptr,                                              # backward + FILTER: [n_tiles, chunk tiles] int8
    # shapes
    n_tokens, hidden_size, vocab_begin, vocab_end, tiles_per_split, n_splits,
    # strides
    stride_hn, stride_hh, stride_wv, stride_wh, stride_dzn, stride_dzv, stride_fn,
    # scalars
    inv_temperature, filter_eps,
    # meta: feature flags then block sizes
    BACKWARD: tl.constexpr, HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, HAS_GRAD_ENT: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_IEEE: tl.constexpr, FILTER: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
):
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(n_tokens, BLOCK_N)
    per_group = GROUP_N * n_splits
    first = (pid // per_group) * GROUP_N
    group_rows = tl.minimum(n_tiles - first, GROUP_N)
    tok_tile = first + (pid % per_group) % group_rows
    split = (pid % per_group) // group_rows

    r_loc = tl.arange(0, BLOCK_N)                               # [BN]
    row0 = tok_tile * BLOCK_N
    rows = row0 + r_loc
    row_ok = rows < n_tokens
    # Scalar tile bases in int64, in-tile offsets in int32 (validate_linear keeps every span < 2**31 elements);
    # padded rows load the last valid row (never stored); padded vocab columns are masked (-inf logits).
    r_ld = tl.minimum(rows, n_tokens - 1) - row0
    h_base = hidden_ptr + row0.to(tl.int64) * stride_hn
    tgt = tl.load(targets_ptr + row0 + r_ld).to(tl.int32)    # [BN]
    v_lo = vocab_begin + split * tiles_per_split * BLOCK_V
    v_hi = tl.minimum(v_lo + tiles_per_split * BLOCK_V, vocab_end)
    k_loc = tl.arange(0, BLOCK_H)                               # [BH]

    if BACKWARD:
        lse = tl.load(lse_ptr + row0 + r_ld)
        g_l = tl.load(glogp_ptr + row0 + r_ld)
        if HAS_GRAD_ENT:
            ent = tl.load(ent_ptr + row0 + r_ld)
            g_e = tl.load(gent_ptr + row0 + r_ld)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    t = tl.zeros([BLOCK_N], tl.float32)
    x = tl.zeros([BLOCK_N], tl.float32)

    h_off = r_ld[:, None] * stride_hn + k_loc[None, :] * stride_hh          # [BN, BH] int32, loop-invariant
    c_loc = tl.arange(0, BLOCK_V)                               # [BV]
    w_off = c_loc[None, :] * stride_wv + k_loc[:, None] * stride_wh         # [BH, BV] int32, loop-invariant
    w_base = weight_ptr + v_lo.to(tl.int64) * stride_wv
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + c_loc
        col_ok = cols < v_hi
        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for k0 in range(0, hidden_size, BLOCK_H):
            k_ok = k_loc < hidden_size - k0
            h = tl.load(h_base + k0 * stride_hh + h_off, mask=k_ok[None, :], other=0.0)                   # [BN, BH]
            w = tl.load(w_base + k0 * stride_wh + w_off, mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # [BH, BV]
            if DOT_FP32:  # interpreter: its bf16 dot is wrong; also mixed/fp32 paths
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            if DOT_IEEE:
                acc = tl.dot(h, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(h, w, acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]   # contiguous [V]
        z = tl.where(col_ok[None, :], acc * inv_temperature, float("-inf"))   # [BN, BV]
        hit = cols[None, :] == tgt[:, None]
        if BACKWARD:
            p = tl.exp(z - lse[:, None])                        # softmax, 0 on padded and -inf columns
            dz = -p * g_l[:, None]
            if HAS_GRAD_ENT:  # p * (log p + entropy); 0 where p = 0 (z = -inf would give 0 * -inf)
                dz -= g_e[:, None] * tl.where(p > 0, p * (z - lse[:, None] + ent[:, None]), 0.0)
            dz = tl.where(hit, dz + g_l[:, None], dz) * inv_temperature
            if FILTER:  # kernels/grad_filter.py: drop the tile if every |dz| <= eps * (|g_logp| + |g_ent|) / T
                u = tl.abs(g_l)
                if HAS_GRAD_ENT:
                    u += tl.abs(g_e)
                # padded columns hold dz = 0 and padded rows repeat row n-1: neither changes the decision
                row_big = tl.max(tl.abs(dz), 1) > (filter_eps * inv_temperature) * u       # [BN]
                keep = tl.max(row_big.to(tl.int32), 0)                                     # 0 or 1
                dz = tl.where(keep > 0, dz, 0.0)
                tl.store(flags_ptr + tok_tile * stride_fn + (v0 - vocab_begin) // BLOCK_V, keep.to(tl.int8))
            out = (dz_ptr + row0.to(tl.int64) * stride_dzn + (v0 - vocab_begin) * stride_dzv
                   + r_loc[:, None] * stride_dzn + c_loc[None, :] * stride_dzv)
            tl.store(out, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
        else:
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
            x += tl.sum(tl.where(hit, z, 0.0), 1)
            m = m_new
        w_base += BLOCK_V * stride_wv

    if not BACKWARD:
        part = split.to(tl.int64) * n_tokens + row0 + r_loc
        tl.store(m_ptr + part, m, mask=row_ok)
        tl.store(s_ptr + part, s, mask=row_ok)
        tl.store(x_ptr + part, x, mask=row_ok)
        if WITH_ENTROPY:
            tl.store(t_ptr + part, t, mask=row_ok)


@kernel(do_not_specialize=["n_tokens", "n_splits"])
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
    """DOT_FP32: upcast dot operands (always under the interpreter, whose bf16 dot is wrong; or mixed dtypes).
    DOT_IEEE: exact fp32 products when the inputs themselves are fp32 (no TF32 rounding)."""
    mixed = len(set(dtypes)) > 1
    fp32_in = all(d == torch.float32 for d in dtypes)
    return {"DOT_FP32": interpreting() or mixed or fp32_in, "DOT_IEEE": fp32_in}


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
    fam = configs.logits_family(arch, hidden.dtype == torch.float32)

    def launch(c):  # one forward pass with config c; returns the per-split partials
        n_tiles = triton.cdiv(n, c.blocks["BLOCK_N"])
        tps, n_splits = _split_plan(n_tiles, triton.cdiv(V, c.blocks["BLOCK_V"]), dev)
        parts = torch.empty(4 if with_entropy else 3, n_splits, n, device=dev, dtype=torch.float32)
        t_part = parts[3] if with_entropy else parts[0]
        _logits_tile_kernel[(n_tiles * n_splits,)](
            hidden, weight, bias if bias is not None else hidden, targets,
            parts[0], parts[1], t_part, parts[2],
            logp, logp, logp, logp, logp, logp,                 # backward-only pointers (unused)
            n, H, 0, V, tps, n_splits,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), 0, 0, 0,
            1.0 / temperature, 0.0,
            BACKWARD=False, HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, HAS_GRAD_ENT=False, FILTER=False,
            **flags, **c.meta(hidden.dtype == torch.float32))
        return parts, t_part, n_splits

    cfg = configs.pick("logits_fwd", fam, (H, V, n.bit_length(), str(hidden.dtype)), bench=launch)
    parts, t_part, n_splits = launch(cfg)
    mcfg = configs.pick("merge", arch)
    _merge_kernel[(triton.cdiv(n, mcfg.blocks["BLOCK"]),)](
        parts[0], parts[1], t_part, parts[2], logp, lse, ent if ent is not None else lse,
        n, n_splits, WITH_ENTROPY=with_entropy, **mcfg.meta())
    return logp, lse, ent


def dlogits_chunk(hidden, weight, bias, targets, lse, ent, g_logp, g_ent, temperature: float,
                  v_begin: int, v_end: int, out: torch.Tensor, arch: str, cfg=None, flags=None,
                  filter_eps: float = 0.0):
    """Backward: write dloss/dlogits for vocab columns [v_begin, v_end) into out[:, :v_end - v_begin].
    With flags ([token tiles, vocab tiles of the chunk] int8), gradient filtering: tiles whose every |dz| is
    <= filter_eps * (|g_logp| + |g_ent|) / T are written as 0 and flagged 0 (kernels/grad_filter.py)."""
    n, H = hidden.shape
    cfg = cfg or configs.pick("logits_bwd", configs.logits_family(arch, hidden.dtype == torch.float32))
    bn, bv = cfg.blocks["BLOCK_N"], cfg.blocks["BLOCK_V"]
    n_tiles, n_vt = triton.cdiv(n, bn), triton.cdiv(v_end - v_begin, bv)
    has_ge = g_ent is not None
    _logits_tile_kernel[(n_tiles * n_vt,)](
        hidden, weight, bias if bias is not None else hidden, targets,
        lse, lse, lse, lse,                                     # forward-only pointers (unused)
        lse, ent if has_ge else lse, g_logp, g_ent if has_ge else g_logp, out, flags if flags is not None else out,
        n, H, v_begin, v_end, 1, n_vt,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
        flags.stride(0) if flags is not None else 0,
        1.0 / temperature, float(filter_eps),
        BACKWARD=True, HAS_BIAS=bias is not None, WITH_ENTROPY=False, HAS_GRAD_ENT=has_ge, FILTER=flags is not None,
        **dot_flags(hidden.dtype, weight.dtype), **cfg.meta(hidden.dtype == torch.float32))
