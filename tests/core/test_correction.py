"""Rollout correction: truncated IS weights and the losses' `weights=` against float64 references written
from the formulas (values and gradients), on shapes that are not powers of two."""
import math

import pytest
import torch

import fastpmd


def data(seed=0, B=7, T=13):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, T, generator=g) > 0.3
    m[3] = False  # a fully masked sequence
    old = torch.where(m, -torch.rand(B, T, generator=g, dtype=torch.float64) * 3, 0.0)
    rollout = torch.where(m, old + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64), 0.0)
    return g, m, old, rollout


def test_truncated_is_weights_against_float64():
    _, m, old, rollout = data()
    rollout[0, m[0]] = old[0, m[0]] - 50.0  # huge ratios: capped, never inf
    for cap in (2.0, 1.3):
        tok = fastpmd.truncated_is_weights(old.float(), rollout.float(), m, cap=cap)
        ref = torch.zeros_like(old)
        seq_ref = torch.zeros(old.shape[0], dtype=torch.float64)
        for b in range(old.shape[0]):
            s = 0.0
            for t in range(old.shape[1]):
                if m[b, t]:
                    ref[b, t] = min(math.exp(old[b, t] - rollout[b, t]), cap)
                    s += float(old[b, t] - rollout[b, t])
            seq_ref[b] = min(math.exp(s), cap)
        torch.testing.assert_close(tok.double(), ref, rtol=1e-6, atol=1e-7)
        seq = fastpmd.truncated_is_weights(old.float(), rollout.float(), m, cap=cap, level="sequence")
        torch.testing.assert_close(seq.double(), seq_ref, rtol=1e-6, atol=1e-7)
        assert (tok[m] < cap).any() and (tok[m] == cap).any() and (seq < cap).any() and (seq == cap).any()
    with pytest.raises(ValueError, match="level"):
        fastpmd.truncated_is_weights(old, rollout, m, level="seq")
    with pytest.raises(ValueError, match="cap"):
        fastpmd.truncated_is_weights(old, rollout, m, cap=0.0)
    with pytest.raises(ValueError, match="rollout_logprobs"):
        fastpmd.truncated_is_weights(old, rollout[:, :-1], m)


def pmd_reference(logp, old, adv, m, w, tau, n_seq):
    """sum_i w_i (A_i - tau Delta_i)^2 / (2 tau) / len_i / n_seq, loops in float64."""
    total = 0.0
    for b in range(logp.shape[0]):
        if m[b].any():
            delta = (logp[b] - old[b])[m[b]].sum()
            total = total + w[b] * (adv[b] - tau * delta) ** 2 / (2 * tau) / m[b].sum()
    return total / n_seq


def test_pmd_loss_weights_against_float64():
    g, m, old, rollout = data(1)
    logp = (old + 0.1 * torch.randn(old.shape, generator=g, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(old.shape[0], generator=g, dtype=torch.float64)
    w = fastpmd.truncated_is_weights(old, rollout, m, level="sequence").double()
    ref = pmd_reference(logp, old, adv, m, w, 0.3, 5.0)
    (g_ref,) = torch.autograd.grad(ref, logp)
    loss, _ = fastpmd.pmd_loss(logp.float(), old.float(), adv.float(), m, tau=0.3, num_sequences=5.0, weights=w.float())
    (g_got,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_got.double(), g_ref, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="weights"):
        fastpmd.pmd_loss(logp, old, adv, m, tau=0.3, weights=w[:-1])


@pytest.mark.parametrize("backend, chunk", [("torch", None), ("torch", 9), ("torch", 30), ("naive", None)])
def test_fused_pmd_weights_against_float64(backend, chunk):
    """9 tokens per chunk: sequences longer than a chunk (two-pass fallback); 30: several sequences per chunk."""
    g, m, old, rollout = data(2)
    B, T, H, V = old.shape[0], old.shape[1], 24, 53
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5
    tgt = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    w = fastpmd.truncated_is_weights(old, rollout, m, cap=1.5, level="sequence").double()
    w[0] = 0.0  # a zero weight: the sequence contributes nothing
    temp = 0.7

    def ref_fn(h_, W_):
        logp = torch.log_softmax(h_ @ W_.T / temp, -1).gather(-1, tgt[..., None]).squeeze(-1)
        return pmd_reference(logp, old, adv, m, w, 0.2, B)

    hr, Wr = h.clone().requires_grad_(), W.clone().requires_grad_()
    ref = ref_fn(hr, Wr)
    ref.backward()
    hf, Wf = h.float().requires_grad_(), W.float().requires_grad_()
    loss, _ = fastpmd.fused_linear_pmd_loss(hf, Wf, tgt, m, old.float(), adv.float(), tau=0.2, temperature=temp,
                                            num_sequences=B, chunk_size=chunk, backend=backend, weights=w.float())
    loss.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hf.grad.double(), hr.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(Wf.grad.double(), Wr.grad, rtol=1e-4, atol=1e-6)
    assert hf.grad[0].abs().max() == 0 and hf.grad[1].abs().max() > 0


@pytest.mark.parametrize("name, loss_type", [("grpo", "grpo"), ("grpo", "dapo"), ("gspo", "grpo")])
def test_grpo_gspo_token_weights_against_float64(name, loss_type):
    g, m, old, rollout = data(3)
    logp = (old + 0.15 * torch.randn(old.shape, generator=g, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(old.shape[0], generator=g, dtype=torch.float64)
    w = fastpmd.truncated_is_weights(old, rollout, m, cap=1.7).double()
    eps_lo, eps_hi = (0.2, 0.2) if name == "grpo" else (3e-4, 4e-4)
    # reference: per-token -min(r A, clip(r) A) * w; grpo: per-sequence token mean, then mean; dapo: sum / tokens
    per_tok, seq_means = [], []
    for b in range(old.shape[0]):
        lr = (logp[b] - old[b])[m[b]]
        if name == "gspo":
            lr = lr.mean().expand_as(lr) if lr.numel() else lr
        r = lr.exp()
        t = -torch.minimum(r * adv[b], r.clamp(1 - eps_lo, 1 + eps_hi) * adv[b]) * w[b][m[b]]
        per_tok.append(t)
        seq_means.append(t.sum() / max(t.numel(), 1))
    ref = sum(seq_means) / old.shape[0] if loss_type == "grpo" else sum(t.sum() for t in per_tok) / m.sum()
    (g_ref,) = torch.autograd.grad(ref, logp)
    fn = fastpmd.grpo_loss if name == "grpo" else fastpmd.gspo_loss
    loss, _ = fn(logp.float(), old.float(), adv.float(), m, loss_type=loss_type, weights=w.float())
    (g_got,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_got.double(), g_ref, rtol=1e-5, atol=1e-7)
    # the same through compute_loss, and pg refuses weights
    cfg = fastpmd.LossConfig(name=name, loss_type=loss_type)
    via, _ = fastpmd.compute_loss(cfg, logp.float(), old.float(), adv.float(), m, weights=w.float())
    assert torch.equal(via, loss)
    with pytest.raises(ValueError, match="weights"):
        fastpmd.compute_loss(fastpmd.LossConfig(name="pg"), logp, old, adv, m, weights=w)
