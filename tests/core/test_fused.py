"""fused_linear_pmd_loss against the float64 composition linear_logprobs(naive) + pmd_loss."""
import pytest
import torch

import fastpmd
from fastpmd.fused import sequence_chunks


def make(dtype, seed=0, bias=False, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    B, T, H, V = 6, 19, 40, 157
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64) * scale
    w = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.5 if bias else None
    t = torch.randint(0, V, (B, T), generator=g)
    m = torch.rand(B, T, generator=g) > 0.3
    m[2] = False  # a fully masked sequence
    old = torch.where(m, -torch.rand(B, T, generator=g, dtype=torch.float64) * 6, 0.0)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return cast(h), cast(w), cast(b), t, m, old, adv


def losses_and_grads(fn, h, w, b):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    loss, met = fn(h, w, b)
    loss.backward()
    return loss.detach().double(), h.grad.double(), w.grad.double(), None if b is None else b.grad.double(), met


def reference(h, w, b, t, m, old, adv, tau, temperature, length_norm):
    def fn(h_, w_, b_):
        lp = fastpmd.linear_logprobs(h_, w_, t, mask=m, bias=b_, temperature=temperature, backend="naive")
        return fastpmd.pmd_loss(lp, old, adv, m, tau=tau, length_norm=length_norm)
    return losses_and_grads(fn, h.double(), w.double(), None if b is None else b.double())


@pytest.mark.parametrize("chunk", [None, 11, 23, 40])  # 11: sequences longer than a chunk -> two-pass fallback
@pytest.mark.parametrize("length_norm,temperature,bias", [(True, 1.0, False), (False, 0.6, True), (25.0, 1.4, False)])
def test_fused_torch_float64_exact(chunk, length_norm, temperature, bias):
    h, w, b, t, m, old, adv = make(torch.float64, bias=bias)
    got = losses_and_grads(lambda h_, w_, b_: fastpmd.fused_linear_pmd_loss(
        h_, w_, t, m, old, adv, tau=0.05, length_norm=length_norm, temperature=temperature, bias=b_,
        chunk_size=chunk, backend="torch"), h, w, b)
    ref = reference(h, w, b, t, m, old, adv, 0.05, temperature, length_norm)
    for x, y in zip(got[:4], ref[:4]):
        if y is not None:
            torch.testing.assert_close(x, y, atol=1e-11, rtol=1e-10)
    for k in ("logratio_mean", "logratio_min", "logratio_max", "residual_abs_mean"):
        torch.testing.assert_close(got[4][k].double(), ref[4][k].double(), atol=1e-5, rtol=1e-5)
    assert got[1][~m].abs().max() == 0  # masked rows get no gradient


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_fused_torch_low_precision(dtype, tol):
    h, w, b, t, m, old, adv = make(dtype, seed=1, scale=3.0)
    got = losses_and_grads(lambda h_, w_, b_: fastpmd.fused_linear_pmd_loss(
        h_, w_, t, m, old, adv, tau=0.1, chunk_size=64, backend="torch"), h, w, b)
    ref = reference(h, w, b, t, m, old, adv, 0.1, 1.0, True)
    assert got[1].dtype == torch.float64 and got[2].shape == w.shape
    for name, x, y in zip(["loss", "grad_hidden", "grad_weight"], got[:3], ref[:3]):
        err = (x - y).abs().max() / y.abs().max().clamp(min=1e-3)
        assert err < tol, f"{name}: rel err {err:.3g}"


def test_fused_upstream_gradient_scales():
    h, w, b, t, m, old, adv = make(torch.float64, seed=2)
    h.requires_grad_()
    loss, _ = fastpmd.fused_linear_pmd_loss(h, w, t, m, old, adv, tau=0.2, backend="torch")
    (3.5 * loss).backward()
    h2 = h.detach().clone().requires_grad_()
    loss2, _ = fastpmd.fused_linear_pmd_loss(h2, w, t, m, old, adv, tau=0.2, backend="naive")
    (3.5 * loss2).backward()
    torch.testing.assert_close(h.grad, h2.grad, atol=1e-12, rtol=1e-10)


def test_fused_global_normaliser():
    h, w, b, t, m, old, adv = make(torch.float64, seed=3)
    full, _ = fastpmd.fused_linear_pmd_loss(h, w, t, m, old, adv, tau=0.05, backend="torch")
    n = int(m.any(-1).sum())
    parts = sum(fastpmd.fused_linear_pmd_loss(h[i:i + 3], w, t[i:i + 3], m[i:i + 3], old[i:i + 3], adv[i:i + 3],
                                              tau=0.05, num_sequences=n, backend="torch")[0] for i in (0, 3))
    torch.testing.assert_close(full, parts)


def test_sequence_chunks():
    assert sequence_chunks([3, 0, 4, 2, 5], 7) == [(0, 7, 0, 3), (7, 14, 3, 5)]
    assert sequence_chunks([8], 7) is None
    assert sequence_chunks([], 7) == [(0, 0, 0, 0)]
