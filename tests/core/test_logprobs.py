"""linear_logprobs: every CPU backend against a float64 reference, values and gradients."""
import pytest
import torch

import fastpmd

# max error relative to the largest reference entry, (values, gradients). bf16 gradients are rounded to bf16
# (2^-8); the naive bf16 baseline also rounds its logits to bf16, the torch backend computes them in fp32.
TOL = {("torch", torch.float32): (2e-6, 2e-5), ("naive", torch.float32): (2e-6, 2e-5),
       ("torch", torch.bfloat16): (1e-5, 8e-3), ("naive", torch.bfloat16): (3e-2, 3e-2)}


def make(n_batch, seq, hid, vocab, dtype, scale, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n_batch, seq, hid, generator=g, dtype=torch.float64) * scale
    w = torch.randn(vocab, hid, generator=g, dtype=torch.float64) / hid**0.5
    b = torch.randn(vocab, generator=g, dtype=torch.float64) if bias else None
    t = torch.randint(0, vocab, (n_batch, seq), generator=g)
    m = torch.rand(n_batch, seq, generator=g) > 0.25
    m[0, 0] = True
    return h.to(dtype), w.to(dtype), None if b is None else b.to(dtype), t, m


def reference(h, w, t, m, b, temperature):
    """float64, materialised, autograd: the oracle."""
    z = h.double() @ w.double().T
    if b is not None:
        z = z + b.double()
    lp_all = torch.log_softmax(z / temperature, -1)
    lp = lp_all.gather(-1, t[..., None])[..., 0]
    ent = -(lp_all.exp() * lp_all).sum(-1)
    return torch.where(m, lp, 0.0), torch.where(m, ent, 0.0)


def run(fn, h, w, b, gl, ge):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    lp, ent = fn(h, w, b)
    (lp.double() * gl).sum().add((ent.double() * ge).sum()).backward()
    return lp.detach().double(), ent.detach().double(), h.grad.double(), w.grad.double(), (
        None if b is None else b.grad.double())


@pytest.mark.parametrize("backend", ["naive", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale,temperature,chunk", [(0.3, 1.0, None), (6.0, 0.7, 7), (1.0, 1.3, 50)])
def test_matches_float64_reference(backend, dtype, scale, temperature, chunk):
    # scale 0.3: flat softmax; scale 6: peaked. B*T = 3*37 = 111 rows, chunk 7 / 50 do not divide it.
    h, w, b, t, m = make(3, 37, 48, 203, dtype, scale, bias=(chunk == 50))
    g = torch.Generator().manual_seed(1)
    gl, ge = torch.randn(t.shape, generator=g, dtype=torch.float64), torch.randn(t.shape, generator=g, dtype=torch.float64)
    got = run(lambda h_, w_, b_: fastpmd.linear_logprobs(h_, w_, t, mask=m, bias=b_, temperature=temperature,
                                                          return_entropy=True, chunk_size=chunk, backend=backend),
              h, w, b, gl, ge)
    ref = run(lambda h_, w_, b_: reference(h_, w_, t, m, b_, temperature), h.double(), w.double(),
              None if b is None else b.double(), gl, ge)
    tol_values, tol_grads = TOL[(backend, dtype)]
    for name, x, y in zip(["logp", "entropy", "grad_hidden", "grad_weight", "grad_bias"], got, ref):
        if y is None:
            continue
        err = (x - y).abs().max() / y.abs().max().clamp(min=1.0)
        assert err < (tol_grads if name.startswith("grad") else tol_values), f"{name}: rel err {err:.3g}"
    # masked rows: zero value, zero gradient
    assert got[0][~m].abs().max() == 0 and got[2][~m].abs().max() == 0


def test_float64_torch_backend_is_exact():
    h, w, b, t, m = make(2, 29, 24, 101, torch.float64, 2.0, bias=True)
    g = torch.Generator().manual_seed(3)
    gl, ge = torch.randn(t.shape, generator=g, dtype=torch.float64), torch.randn(t.shape, generator=g, dtype=torch.float64)
    got = run(lambda h_, w_, b_: fastpmd.linear_logprobs(h_, w_, t, mask=m, bias=b_, temperature=0.9,
                                                          return_entropy=True, chunk_size=13, backend="torch"),
              h, w, b, gl, ge)
    ref = run(lambda h_, w_, b_: reference(h_, w_, t, m, b_, 0.9), h, w, b, gl, ge)
    for x, y in zip(got, ref):
        torch.testing.assert_close(x, y, atol=1e-10, rtol=1e-10)


def test_dtypes_and_no_mask():
    h, w, _, t, _ = make(2, 11, 16, 53, torch.bfloat16, 1.0)
    h.requires_grad_()
    w.requires_grad_()
    lp = fastpmd.linear_logprobs(h, w, t, backend="torch", chunk_size=5)
    assert lp.dtype == torch.float32 and lp.shape == t.shape
    lp.sum().backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    ref, _ = reference(h.detach(), w.detach(), t, torch.ones_like(t, dtype=torch.bool), None, 1.0)
    torch.testing.assert_close(lp.double(), ref, atol=0.05, rtol=0.01)


def test_entropy_only_gradient():
    h, w, _, t, m = make(2, 9, 16, 31, torch.float64, 1.5)
    h.requires_grad_()
    _, ent = fastpmd.linear_logprobs(h, w, t, mask=m, return_entropy=True, backend="torch", chunk_size=4)
    ent.sum().backward()
    h2 = h.detach().clone().requires_grad_()
    _, ent2 = reference(h2, w, t, m, None, 1.0)
    ent2.sum().backward()
    torch.testing.assert_close(h.grad, h2.grad, atol=1e-10, rtol=1e-10)


def test_fully_masked_and_empty():
    h, w, _, t, _ = make(2, 5, 8, 17, torch.float32, 1.0)
    h.requires_grad_()
    m = torch.zeros(2, 5, dtype=torch.bool)
    lp = fastpmd.linear_logprobs(h, w, t, mask=m, backend="torch")
    lp.sum().backward()
    assert lp.abs().sum() == 0 and h.grad.abs().sum() == 0


def test_auto_is_torch_on_cpu():
    from fastpmd.dispatch import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "torch"
