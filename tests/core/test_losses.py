"""Advantages and losses: hand-computed cases, properties, and parity with Liger-Kernel's GRPO loss."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastpmd


def test_advantages_hand_cases():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    a = fastpmd.advantages(r, group_size=4, estimator="mean")
    torch.testing.assert_close(a, torch.tensor([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75]))
    a = fastpmd.advantages(r, group_size=4, estimator="loo")
    torch.testing.assert_close(a, torch.tensor([2, -2, -2, 2, 1 / 3, 1 / 3, 1 / 3, -1]) / 3 * torch.tensor(
        [1, 1, 1, 1, 3, 3, 3, 3.0]))
    a = fastpmd.advantages(r, group_size=4, estimator="grpo", eps=1e-30)  # eps > 0 is required
    std = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    torch.testing.assert_close(a[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / std)


def test_partition_is_exact_at_small_tau():
    # tau = 0.01, rewards in {-1, 1}: exp(-200) underflows in float32; logsumexp must keep it exact.
    r = torch.tensor([1.0, -1.0, -1.0, -1.0])
    tau = 0.01
    a = fastpmd.advantages(r, group_size=4, estimator="partition", tau=tau)
    torch.testing.assert_close(a, torch.tensor([tau * math.log(4), -2 + tau * math.log(4), -2 + tau * math.log(4),
                                                -2 + tau * math.log(4)]))
    a = fastpmd.advantages(r, group_size=4, estimator="partition_loo", tau=tau)
    # a lone correct answer: the others' mean of exp(r/tau) is exp(-100), so b = -1 and A = 2 (not ~0.18)
    torch.testing.assert_close(a, torch.tensor([2.0, -2 + tau * math.log(3), -2 + tau * math.log(3),
                                                -2 + tau * math.log(3)]))
    assert torch.isfinite(a).all()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-3, 3), min_size=6, max_size=6), st.floats(0.02, 5.0), st.floats(-10, 10))
def test_advantage_properties(rs, tau, shift):
    r = torch.tensor(rs, dtype=torch.float64)
    for est in ("mean", "loo"):  # centred, shift invariant
        a = fastpmd.advantages(r, group_size=3, estimator=est)
        torch.testing.assert_close(a.view(2, 3).sum(1), torch.zeros(2, dtype=torch.float64), atol=1e-9, rtol=0)
        torch.testing.assert_close(fastpmd.advantages(r + shift, group_size=3, estimator=est), a)
    p = fastpmd.advantages(r, group_size=3, estimator="partition", tau=tau)
    m = fastpmd.advantages(r, group_size=3, estimator="mean")
    assert (p <= m + 1e-9).all()  # tau*log mean exp(r/tau) >= mean r (Jensen)
    torch.testing.assert_close(fastpmd.advantages(r + shift, group_size=3, estimator="partition", tau=tau), p)


def test_pmd_loss_hand_case():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, 0.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -1.0, -7.0], [-0.1, -9.0, float("-inf")]])  # masked entries may be anything
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([0.5, -0.5])
    tau = 0.1
    d0, d1 = (-1.0 + 1.5) + (-2.0 + 1.0), -0.3 + 0.1  # -0.5, -0.2
    l0, l1 = (0.5 - tau * d0) ** 2 / (2 * tau) / 2, (-0.5 - tau * d1) ** 2 / (2 * tau) / 1
    loss, met = fastpmd.pmd_loss(logp, old, adv, mask, tau=tau)
    assert math.isclose(loss.item(), (l0 + l1) / 2, rel_tol=1e-6)
    loss.backward()
    g = torch.tensor([[-(0.5 - tau * d0) / 2 / 2] * 2 + [0.0], [-(-0.5 - tau * d1) / 1 / 2, 0.0, 0.0]])
    torch.testing.assert_close(logp.grad, g)
    assert math.isclose(met["logratio_min"].item(), -0.5, rel_tol=1e-6)
    assert math.isclose(met["logratio_max"].item(), -0.2, rel_tol=1e-6)
    assert not met["loss"].requires_grad
    loss_c, _ = fastpmd.pmd_loss(logp, old, adv, mask, tau=tau, length_norm=4.0)
    assert math.isclose(loss_c.item(), ((0.5 - tau * d0) ** 2 + (-0.5 - tau * d1) ** 2) / (2 * tau) / 4 / 2,
                        rel_tol=1e-6)


def test_pmd_loss_at_delta_zero_is_rloo_policy_gradient():
    torch.manual_seed(0)
    logp = torch.randn(6, 5, requires_grad=True)
    mask = torch.rand(6, 5) > 0.3
    mask[:, 0] = True
    adv = fastpmd.advantages(torch.randn(6), group_size=3, estimator="loo")
    loss, _ = fastpmd.pmd_loss(logp, logp.detach(), adv, mask, tau=0.37)
    g_pmd, = torch.autograd.grad(loss, logp)
    pg, _ = fastpmd.pg_loss(logp, logp.detach(), adv, mask)
    g_pg, = torch.autograd.grad(pg, logp)
    torch.testing.assert_close(g_pmd, g_pg)


def test_accumulation_equals_one_big_batch():
    torch.manual_seed(1)
    logp = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    old = torch.randn(8, 6, dtype=torch.float64)
    mask = torch.rand(8, 6) > 0.4
    mask[3] = False  # a fully masked sequence contributes nothing
    adv = torch.randn(8, dtype=torch.float64)
    n_seq = int(mask.any(-1).sum())
    full, _ = fastpmd.pmd_loss(logp, old, adv, mask, tau=0.2)
    parts = sum(fastpmd.pmd_loss(logp[i:i + 3], old[i:i + 3], adv[i:i + 3], mask[i:i + 3], tau=0.2,
                                 num_sequences=n_seq)[0] for i in (0, 3, 6))
    torch.testing.assert_close(full, parts)
    ntok = int(mask.sum())
    full, _ = fastpmd.grpo_loss(logp, old, adv, mask, loss_type="dapo")
    parts = sum(fastpmd.grpo_loss(logp[i:i + 3], old[i:i + 3], adv[i:i + 3], mask[i:i + 3], loss_type="dapo",
                                  num_items=ntok)[0] for i in (0, 3, 6))
    torch.testing.assert_close(full, parts)


def _trl_reference(logp, old, adv, mask, loss_type, el, eh, beta, ref, max_len, level):
    """TRL GRPOTrainer._compute_loss, transcribed (mask as float, as TRL does)."""
    m = mask.float()
    log_ratio = logp - old
    if level == "sequence":
        log_ratio = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    c1 = torch.exp(log_ratio)
    c2 = torch.clamp(c1, 1 - el, 1 + eh)
    ptl = -torch.min(c1 * adv.unsqueeze(1), c2 * adv.unsqueeze(1))
    if beta != 0.0:
        ptl = ptl + beta * (torch.exp(ref - logp) - (ref - logp) - 1)
    if loss_type == "grpo":
        return ((ptl * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    if loss_type in ("bnpo", "dapo"):
        return (ptl * m).sum() / m.sum().clamp(min=1.0)
    return (ptl * m).sum() / (ptl.size(0) * max_len)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_matches_trl_formula(loss_type, level):
    torch.manual_seed(2)
    logp = (torch.randn(5, 7, dtype=torch.float64) - 2).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(5, 7, dtype=torch.float64)
    ref = logp.detach() + 0.2 * torch.randn(5, 7, dtype=torch.float64)
    mask = torch.rand(5, 7) > 0.3
    mask[:, 0] = True
    adv = torch.randn(5, dtype=torch.float64)
    got, _ = fastpmd.grpo_loss(logp, old, adv, mask, loss_type=loss_type, epsilon_high=0.28, beta=0.04,
                               ref_logprobs=ref, max_completion_length=9, importance_sampling_level=level)
    want = _trl_reference(logp, old, adv, mask, loss_type, 0.2, 0.28, 0.04, ref, 9, level)
    torch.testing.assert_close(got, want)
    g1, = torch.autograd.grad(got, logp)
    g2, = torch.autograd.grad(want, logp)
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_matches_liger(loss_type, level):
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    torch.manual_seed(3)
    B, T, H, V = 4, 7, 16, 37
    h, w = torch.randn(B, T, H), torch.randn(V, H) * 0.3
    t = torch.randint(0, V, (B, T))
    m = (torch.rand(B, T) > 0.3).long()
    m[:, 0] = 1
    lp0 = fastpmd.linear_logprobs(h, w, t, mask=m.bool(), backend="naive")
    old = torch.where(m.bool(), lp0 + 0.3 * torch.randn(B, T), 0.0)
    adv = torch.randn(B)
    eps = (0.2, 0.28) if level == "token" else (3e-4, 4e-4)
    ref_loss = liger.LigerFusedLinearGRPOLoss(beta=0.0, compiled=False, use_ref_model=False, loss_type=loss_type,
                                              max_completion_length=T, importance_sampling_level=level,
                                              epsilon_low=eps[0], epsilon_high=eps[1])
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss1 = ref_loss(h1, w1, t, m, adv, old_per_token_logps=old)[0]
    loss1.backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp = fastpmd.linear_logprobs(h2, w2, t, mask=m.bool(), backend="torch", chunk_size=5)
    fn = fastpmd.grpo_loss if level == "token" else fastpmd.gspo_loss
    kw = dict(epsilon_low=eps[0], epsilon_high=eps[1])
    loss2, _ = fn(lp, old, adv, m, loss_type=loss_type, max_completion_length=T, **kw)
    loss2.backward()
    torch.testing.assert_close(loss2, loss1.detach(), atol=1e-6, rtol=1e-5)
    assert h2.grad.abs().max() > 0
    torch.testing.assert_close(h2.grad, h1.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(w2.grad, w1.grad, atol=1e-6, rtol=1e-4)


def test_loss_config_dispatch():
    """Each name reaches its own loss and estimator: the value equals the direct call (a wrong dispatch differs)."""
    torch.manual_seed(4)
    logp = torch.randn(4, 3)
    old = logp - 0.3 * torch.rand(4, 3)
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[1, 2] = False
    r = torch.tensor([1.0, 0.0, 1.0, 1.0])
    direct = {
        "pmd-mean": lambda: fastpmd.pmd_loss(logp, old, fastpmd.advantages(r, group_size=2, estimator="mean"),
                                             mask, tau=0.1),
        "pmd-part": lambda: fastpmd.pmd_loss(logp, old, fastpmd.advantages(r, group_size=2, estimator="partition",
                                                                           tau=0.1), mask, tau=0.1),
        "grpo": lambda: fastpmd.grpo_loss(logp, old, fastpmd.advantages(r, group_size=2, estimator="grpo"), mask),
        "gspo": lambda: fastpmd.gspo_loss(logp, old, fastpmd.advantages(r, group_size=2, estimator="grpo"), mask),
        "pg": lambda: fastpmd.pg_loss(logp, old, fastpmd.advantages(r, group_size=2, estimator="loo"), mask),
        **{n: (lambda fn: lambda: fn(logp, old, fastpmd.advantages(r, group_size=2, estimator="grpo"), mask))(fn)
           for n, fn in (("cispo", fastpmd.cispo_loss), ("sapo", fastpmd.sapo_loss), ("luspo", fastpmd.luspo_loss))},
    }
    assert set(direct) == set(fastpmd.LOSS_NAMES)
    values = {}
    for name in fastpmd.LOSS_NAMES:
        cfg = fastpmd.LossConfig(name=name, tau=0.1)
        adv = fastpmd.advantages_for(cfg, r, group_size=2)
        loss, met = fastpmd.compute_loss(cfg, logp, old, adv, mask)
        want, _ = direct[name]()
        torch.testing.assert_close(loss, want, rtol=0, atol=0)
        assert "loss" in met
        values[name] = float(loss)
    assert len(set(values.values())) == len(values)  # the losses differ on this batch
    with pytest.raises(ValueError, match="estimator"):
        fastpmd.LossConfig(name="pmd-mean", estimator="partition")
    with pytest.raises(ValueError, match="name"):
        fastpmd.LossConfig(name="ppo")
