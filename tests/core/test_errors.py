"""Bad input: a ValueError that names the argument, before any work."""
import pytest
import torch

import fastpmd


def args(B=2, T=3, H=4, V=5):
    return dict(hidden=torch.randn(B, T, H), weight=torch.randn(V, H), targets=torch.randint(0, V, (B, T)))


@pytest.mark.parametrize("change,match", [
    (dict(weight=torch.randn(5, 6)), "hidden width"),
    (dict(targets=torch.zeros(2, 4, dtype=torch.long)), "targets shape"),
    (dict(targets=torch.zeros(2, 3)), "targets must be an integer"),
    (dict(targets=torch.full((2, 3), 5)), r"targets must lie in \[0, V=5\)"),
    (dict(targets=torch.full((2, 3), -1)), "targets must lie"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(backend="cuda"), "backend"),
    (dict(mask=torch.ones(3, 2, dtype=torch.bool)), "mask"),
    (dict(bias=torch.randn(4)), "bias"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(weight=torch.randn(5, 4, dtype=torch.float64)), "dtype"),
])
def test_linear_logprobs_errors(change, match):
    kw = args()
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        fastpmd.linear_logprobs(kw.pop("hidden"), kw.pop("weight"), kw.pop("targets"), **kw)


def test_masked_out_of_range_targets_are_fine():
    kw = args()
    t = kw["targets"].clone()
    t[0, 0] = -100  # ignore-index convention at a masked position
    m = torch.ones(2, 3, dtype=torch.bool)
    m[0, 0] = False
    lp = fastpmd.linear_logprobs(kw["hidden"], kw["weight"], t, mask=m)
    assert lp[0, 0] == 0 and torch.isfinite(lp).all()


def test_triton_without_cuda_is_clear():
    import os
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter makes the triton backend available on CPU")
    kw = args()
    with pytest.raises(ValueError, match="triton"):
        fastpmd.linear_logprobs(kw["hidden"], kw["weight"], kw["targets"], backend="triton")


@pytest.mark.parametrize("kw,match", [
    (dict(group_size=3), "group_size"),
    (dict(group_size=0), "group_size"),
    (dict(estimator="median"), "estimator"),
    (dict(estimator="partition"), "tau"),
    (dict(estimator="partition", tau=-1.0), "tau"),
    (dict(rewards=torch.tensor([1.0, float("nan"), 0.0, 1.0])), "finite"),
    (dict(rewards=torch.tensor([1.0, float("inf"), 0.0, 1.0])), "finite"),
])
def test_advantages_errors(kw, match):
    full = dict(rewards=torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=2, estimator="mean")
    full.update(kw)
    with pytest.raises(ValueError, match=match):
        fastpmd.advantages(full.pop("rewards"), **full)


def test_loss_errors():
    lp, m, a = torch.randn(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.randn(2)
    with pytest.raises(ValueError, match="tau"):
        fastpmd.pmd_loss(lp, lp, a, m, tau=0.0)
    with pytest.raises(ValueError, match="advantages"):
        fastpmd.pmd_loss(lp, lp, torch.randn(3), m, tau=0.1)
    with pytest.raises(ValueError, match="old_logprobs"):
        fastpmd.pmd_loss(lp, lp[:, :2], a, m, tau=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        fastpmd.grpo_loss(lp, lp, a, m, loss_type="ppo")
    with pytest.raises(ValueError, match="ref_logprobs"):
        fastpmd.grpo_loss(lp, lp, a, m, beta=0.1)
    with pytest.raises(ValueError, match="mask"):
        fastpmd.pmd_loss(lp, lp, a, m.float(), tau=0.1)
    kw = args()
    with pytest.raises(ValueError, match="tau"):
        fastpmd.fused_linear_pmd_loss(kw["hidden"], kw["weight"], kw["targets"], m, lp, a, tau=-1.0)
    with pytest.raises(ValueError, match="hidden"):
        fastpmd.fused_linear_pmd_loss(kw["hidden"][0], kw["weight"], kw["targets"][0], m, lp, a, tau=1.0)
    with pytest.raises(ValueError, match="length_norm"):
        fastpmd.fused_linear_pmd_loss(kw["hidden"], kw["weight"], kw["targets"], m, lp, a, tau=1.0, length_norm=-2.0)


def test_fully_masked_batch_is_finite():
    kw = args()
    m = torch.zeros(2, 3, dtype=torch.bool)
    h = kw["hidden"].requires_grad_()
    loss, met = fastpmd.fused_linear_pmd_loss(h, kw["weight"], kw["targets"], m, torch.zeros(2, 3), torch.ones(2),
                                              tau=0.1)
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(h.grad).all() and h.grad.abs().sum() == 0
    assert all(torch.isfinite(v) for v in met.values())
