"""fastpmd.nn.FusedLinearPMDLoss equals fused_linear_pmd_loss (and the float64 reference), values and gradients."""
import pytest
import torch

import fastpmd
from fastpmd.nn import FusedLinearPMDLoss


def batch(seed=0, B=3, T=7, H=12, V=29, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype)
    weight = 0.3 * torch.randn(V, H, generator=g, dtype=dtype)
    bias = 0.1 * torch.randn(V, generator=g, dtype=dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    old = torch.where(mask, -3 + 0.5 * torch.randn(B, T, generator=g, dtype=dtype), 0.0)
    return hidden, weight, targets, mask, old, torch.randn(B, generator=g, dtype=dtype), bias


@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("opts", [dict(), dict(tau=0.3, length_norm=5.0, temperature=0.7, chunk_size=4)])
def test_module_equals_function(opts, use_bias):
    hidden, weight, targets, mask, old, adv, bias = batch()
    bias = bias if use_bias else None
    loss_fn = FusedLinearPMDLoss(backend="torch", **opts)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss1, met1 = loss_fn(h1, w1, targets, mask, old, adv, bias=bias)
    loss1.backward()
    kw = {"tau": 0.01, **opts}
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss2, met2 = fastpmd.fused_linear_pmd_loss(h2, w2, targets, mask, old, adv, bias=bias, backend="torch", **kw)
    loss2.backward()
    assert torch.equal(loss1, loss2) and torch.equal(h1.grad, h2.grad) and torch.equal(w1.grad, w2.grad)
    assert met1.keys() == met2.keys()
    # and the float64 plain-PyTorch reference
    h3, w3 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    lp = fastpmd.linear_logprobs(h3, w3, targets, mask=mask, bias=None if bias is None else bias.double(),
                                 temperature=kw.get("temperature", 1.0), backend="naive")
    ref, _ = fastpmd.pmd_loss(lp, old.double(), adv.double(), mask, tau=kw["tau"],
                              length_norm=kw.get("length_norm", True))
    ref.backward()
    torch.testing.assert_close(loss1.double(), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(h1.grad.double(), h3.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w1.grad.double(), w3.grad, rtol=1e-4, atol=1e-6)


def test_module_options_validated():
    with pytest.raises(ValueError, match="tau"):
        FusedLinearPMDLoss(tau=0.0)
    with pytest.raises(ValueError, match="backend"):
        FusedLinearPMDLoss(backend="cuda")
    with pytest.raises(ValueError, match="chunk_size"):
        FusedLinearPMDLoss(chunk_size=0)
    assert "tau=0.5" in repr(FusedLinearPMDLoss(tau=0.5))
