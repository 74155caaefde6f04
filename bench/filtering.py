"""`python -m fastpmd.bench.filtering`: what opt-in gradient filtering (kernels/grad_filter.py) costs in accuracy
and how much backward work it could skip, measured on CPU with the torch reference of the kernel's rule.

(a) error: float64 gradients grad_hidden = dz @ W and grad_weight = dz.T @ h with the filter against without,
    on peaked and flat logit distributions, next to the error of merely rounding dz to bf16 (what the bf16
    kernels do anyway);
(b) dropped blocks: the fraction of (BLOCK_N x BLOCK_V) dlogits blocks the rule drops, i.e. the fraction of the
    two gradient GEMMs' K-steps the Triton matmul skips (the predicted speed-up of those GEMMs; the dlogits
    kernel itself still runs in full), on
    - the logits of a tiny Qwen2 LM trained here for a few hundred steps on synthetic Zipf-Markov text, and
    - synthetic Zipf-peaked logits at Qwen's V = 152064 (popularity following the token id, as BPE vocabularies
      roughly do, and in a random order, the worst case for block sparsity).
The upstream gradient is a per-sequence +-1 coefficient (as the PMD loss gives), no entropy term.

Plain PyTorch throughout (no Triton): dz = g * (onehot - softmax(z)), then grad_filter.reference_filter.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from fastpmd.kernels.grad_filter import DEFAULT_EPS, reference_filter

BLOCKS = ((128, 128), (128, 64))        # dlogits tiles: sm_90/sm_100 pinned, sm_80/sm_120 pinned
EPS = (2.0**-10, DEFAULT_EPS, 2.0**-14)


def dlogits(z: torch.Tensor, targets: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """dz of sum(g * logp) for logits z [n, V] (in z's dtype)."""
    dz = torch.softmax(z, -1).mul_(-g[:, None])
    dz.scatter_add_(1, targets[:, None], g[:, None])
    return dz


def seq_coefficients(n: int, seq_len: int, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """Per-token upstream gradient: one random +-U(0.5, 1.5) value per sequence of seq_len tokens."""
    per_seq = (torch.rand(-(-n // seq_len), generator=gen) + 0.5) * torch.sign(torch.randn(-(-n // seq_len),
                                                                                         generator=gen))
    return per_seq.repeat_interleave(seq_len)[:n].to(dtype)


def distribution_stats(z: torch.Tensor) -> dict:
    """Mean top-1 probability and mean entropy (nats) of softmax(z) rows."""
    logp = torch.log_softmax(z.double(), -1)
    return {"top1_p": logp.max(-1).values.exp().mean().item(),
            "entropy": (-(logp.exp() * logp).sum(-1)).mean().item()}


def dropped_fraction(z, targets, g, eps, block) -> float:
    keep = reference_filter(dlogits(z, targets, g), g, None, 1.0, eps, *block)[1]
    return 1.0 - keep.float().mean().item()


# ----------------------------------------------------------------------------------------------- (a) error
def error_rows(n=256, H=256, V=32768, seed=0) -> list[dict]:
    """Relative errors of the two gradient GEMMs' results with the filter, against float64 without it; dz from
    flat Gaussian logits and from peaked Zipf ones (zipf_logits), operands h [n, H], W [V, H] random."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, H, generator=gen, dtype=torch.float64)
    w = torch.randn(V, H, generator=gen, dtype=torch.float64)
    g = seq_coefficients(n, 64, gen, torch.float64)
    flat = torch.randn(n, V, generator=gen) * 0.5
    flat_targets = torch.multinomial(torch.softmax(flat, -1), 1, generator=gen)[:, 0]
    cases = [("flat: Gaussian logits, std 0.5", flat, flat_targets)]
    for alpha, noise in ((1.0, 3.0), (1.5, 2.0)):
        cases.append((f"peaked: Zipf alpha {alpha}, noise {noise}", *zipf_logits(n, V, alpha, noise, seed=seed)))
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    rows = []
    for name, z, targets in cases:
        dz = dlogits(z.double(), targets, g)
        gh, gw = dz @ w, dz.T @ h
        dzb = dz.to(torch.bfloat16).double()
        base = {"distribution": name, **distribution_stats(z), "bf16_dz_rel_err_gh": rel(dzb @ w, gh),
                "bf16_dz_rel_err_gw": rel(dzb.T @ h, gw)}
        for eps in EPS:
            dzf, keep = reference_filter(dz, g, None, 1.0, eps, 128, 128)
            rows.append({**base, "eps": eps, "dropped_128x128": 1.0 - keep.float().mean().item(),
                         "rel_err_gh": rel(dzf @ w, gh), "rel_err_gw": rel(dzf.T @ h, gw),
                         "max_err_gw": ((dzf.T @ h - gw).abs().max() / gw.abs().max()).item()})
    return rows


# ------------------------------------------------------------------------------------ (b) trained tiny LM
def zipf_markov_text(V: int, n_seqs: int, seq_len: int, gen: torch.Generator, succ: int = 16) -> torch.Tensor:
    """Token sequences [n_seqs, seq_len] of a sparse bigram chain: each token has `succ` successors drawn from a
    Zipf(1.1) unigram over the ids, with Zipf(1) transition weights; 10% of steps jump by the unigram."""
    ranks = torch.arange(1, V + 1, dtype=torch.float64)
    unigram = ranks.pow(-1.1)
    unigram /= unigram.sum()
    nxt = torch.multinomial(unigram.float(), V * succ, replacement=True, generator=gen).view(V, succ)
    trans = torch.arange(1, succ + 1, dtype=torch.float64).pow(-1.0)
    trans /= trans.sum()
    out = torch.empty(n_seqs, seq_len, dtype=torch.long)
    out[:, 0] = torch.multinomial(unigram.float(), n_seqs, replacement=True, generator=gen)
    for t in range(1, seq_len):
        pick = torch.multinomial(trans.float(), n_seqs, replacement=True, generator=gen)
        step = nxt[out[:, t - 1], pick]
        jump = torch.rand(n_seqs, generator=gen) < 0.1
        out[:, t] = torch.where(jump, torch.multinomial(unigram.float(), n_seqs, replacement=True, generator=gen),
                                step)
    return out


def trained_lm_logits(V=8192, steps=300, seq_len=64, batch=16, seed=0, log=print):
    """Train a 2-layer Qwen2 (hidden 64) on zipf_markov_text; return (eval logits [n, V], targets [n], info)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq_len,
                      tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = zipf_markov_text(V, batch * steps // 4 + 64, seq_len, gen)      # each sequence seen ~4 times
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, data.shape[0] - 64, (batch,), generator=gen)
        ids = data[idx]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            log(f"  tiny LM step {step}: loss {loss.item():.3f}")
    model.eval()
    held = data[-64:][:8]                                                   # never sampled for training
    with torch.no_grad():
        hid = model.model(input_ids=held).last_hidden_state[:, :-1].reshape(-1, 64)
        z = model.lm_head(hid)
    info = {"V": V, "steps": steps, "train_s": round(time.perf_counter() - t0, 1), "final_loss": loss.item()}
    return z, held[:, 1:].reshape(-1), info


# -------------------------------------------------------------------------------------- (b) Zipf at 152064
def zipf_logits(n=256, V=152064, alpha=1.0, noise=3.0, shuffled=False, seed=0):
    """z[i, j] = -alpha * log(rank(j)) + noise * N(0, 1): Zipf popularity plus per-token variation; targets
    sampled from softmax(z). rank follows the id (BPE-like) or a random permutation (shuffled)."""
    gen = torch.Generator().manual_seed(seed)
    rank = torch.arange(1, V + 1, dtype=torch.float32)
    if shuffled:
        rank = rank[torch.randperm(V, generator=gen)]
    z = torch.randn(n, V, generator=gen).mul_(noise).add_(-alpha * rank.log())
    targets = torch.multinomial(torch.softmax(z, -1), 1, generator=gen)[:, 0]
    return z, targets


def dropped_rows(log=print, lm_steps=300) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(1)
    z, t, info = trained_lm_logits(steps=lm_steps, log=log)
    cases = [(f"tiny Qwen2 LM, V={info['V']}, {info['steps']} steps (loss {info['final_loss']:.2f})", z, t)]
    for alpha, noise, shuffled in ((1.0, 3.0, False), (1.0, 5.0, False), (1.0, 3.0, True)):
        zz, tt = zipf_logits(alpha=alpha, noise=noise, shuffled=shuffled)
        order = "random order" if shuffled else "id order"
        cases.append((f"Zipf V=152064, alpha {alpha}, noise {noise}, {order}", zz, tt))
    for name, z, t in cases:
        g = seq_coefficients(z.shape[0], 64, gen)
        stats = distribution_stats(z)
        for block in BLOCKS:
            for eps in EPS:
                rows.append({"logits": name, "n": z.shape[0], **stats, "block": f"{block[0]}x{block[1]}",
                             "eps": eps, "dropped": dropped_fraction(z, t, g, eps, block)})
        del z
    return rows


def markdown(err: list[dict], drop: list[dict]) -> str:
    out = ["(a) error vs float64 gradients (n=256, H=256, V=32768; blocks 128x128; upstream +-1 per 64 tokens)", "",
           "| distribution | top-1 p | entropy | eps | dropped | rel err grad_h | rel err grad_W | "
           "max err grad_W | bf16-dz rel err grad_h / grad_W |", "|---|---|---|---|---|---|---|---|---|"]
    for r in err:
        out.append(f"| {r['distribution']} | {r['top1_p']:.3f} | {r['entropy']:.2f} | 2^{math.log2(r['eps']):.0f} | "
                   f"{r['dropped_128x128']:.1%} | {r['rel_err_gh']:.2e} | {r['rel_err_gw']:.2e} | "
                   f"{r['max_err_gw']:.2e} | {r['bf16_dz_rel_err_gh']:.2e} / {r['bf16_dz_rel_err_gw']:.2e} |")
    out += ["", "(b) fraction of dlogits blocks dropped (= gradient-GEMM K-steps skipped)", "",
            "| logits | n | top-1 p | entropy | block | eps | dropped |", "|---|---|---|---|---|---|---|"]
    for r in drop:
        out.append(f"| {r['logits']} | {r['n']} | {r['top1_p']:.3f} | {r['entropy']:.2f} | {r['block']} | "
                   f"2^{math.log2(r['eps']):.0f} | {r['dropped']:.1%} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastpmd.bench.filtering", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="directory for filtering.json and filtering.md")
    p.add_argument("--lm-steps", type=int, default=300, help="training steps of the tiny LM")
    a = p.parse_args(argv)
    torch.set_num_threads(1)          # a small, shared CPU: one thread is the fastest here
    err = error_rows()
    drop = dropped_rows(lm_steps=a.lm_steps)
    md = markdown(err, drop)
    print(md)
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "filtering.json").write_text(json.dumps({"error": err, "dropped": drop}, indent=1))
        (a.out / "filtering.md").write_text(md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
