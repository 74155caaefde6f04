"""Per-sequence tau: the mean-reward schedule's formula against the exact PMD-mean update, and pmd_loss /
fused_linear_pmd_loss with a [B] tau against a per-sequence float64 reference; the released code's metrics."""
import math

import numpy as np
import pytest
import torch

import fastpmd
from fastpmd.tau_schedule import reference_logodds_step, sequence_tau, tau_for_logodds_step
from fastpmd.theory import pmd_mean_update
from test_fused import losses_and_grads, make


def logodds_step_of_exact_update(p, tau, low=0.0, high=1.0):
    """log-odds change of success under the exact population PMD-mean update of a two-outcome policy."""
    new = pmd_mean_update(np.array([p, 1 - p]), np.array([high, low]), tau).pi
    return math.log(new[0] / new[1]) - math.log(p / (1 - p))


@pytest.mark.parametrize("gap", [1.0, 2.0])
@pytest.mark.parametrize("step", [0.7, 4.1, 12.0, 60.0])
def test_formula_gives_the_exact_update_step(step, gap):
    for p in (0.01, 0.05, 0.2, 0.5, 0.8, 0.97):
        tau = float(tau_for_logodds_step(torch.tensor(p, dtype=torch.float64), step, gap))
        assert logodds_step_of_exact_update(p, tau, -gap / 2, gap / 2) == pytest.approx(step, rel=1e-6)


def test_formula_values():
    # PMD_NOTES: tau 0.05, 0/1 rewards, p = 0.01 -> 0.379 (log-odds +4.10): the formula inverts it
    step = math.log(0.379 / 0.621) - math.log(0.01 / 0.99)
    assert float(tau_for_logodds_step(torch.tensor(0.01, dtype=torch.float64), step)) == pytest.approx(0.05, rel=5e-3)  # 0.379 is rounded
    # closed form by hand at p = 1/2, step = ln 3: u_w = 1/(1 + (3-1)/2) = 1/2, tau = 1/(u_w*ln(3/2) - (3/2)*ln(1/2))
    by_hand = 1.0 / (0.5 * math.log(1.5) + 1.5 * math.log(2.0))
    assert float(tau_for_logodds_step(torch.tensor(0.5, dtype=torch.float64), math.log(3))) == pytest.approx(
        by_hand, rel=1e-12)
    # endpoints (no signal): g / step; large steps do not overflow
    ends = tau_for_logodds_step(torch.tensor([0.0, 1.0], dtype=torch.float64), 800.0, 2.0)
    torch.testing.assert_close(ends, torch.full((2,), 2.0 / 800, dtype=torch.float64), rtol=1e-12, atol=0)


def test_reference_step_and_schedule():
    for tau in (0.01, 0.1, 1.0):
        step = reference_logodds_step(tau, gap=2.0)
        assert float(tau_for_logodds_step(torch.tensor(0.5, dtype=torch.float64), step, 2.0)) == pytest.approx(
            tau, rel=1e-9)
    r = torch.tensor([1, -1, -1, -1, 1, 1, -1, 1, -1, -1, -1, -1], dtype=torch.float64)  # p = 1/4, 3/4, 0
    t = sequence_tau(r, tau=0.1, schedule="mean-reward", low=-1.0, high=1.0, group_size=4)
    step = reference_logodds_step(0.1, gap=2.0)
    for g, p in enumerate((0.25, 0.75, 0.0)):
        want = float(tau_for_logodds_step(torch.tensor(p, dtype=torch.float64), step, 2.0))
        torch.testing.assert_close(t[4 * g:4 * g + 4], torch.full((4,), want, dtype=torch.float64), rtol=1e-12, atol=0)
        assert logodds_step_of_exact_update(p, want, -1.0, 1.0) == pytest.approx(step, rel=1e-6) if 0 < p < 1 else True
    assert t[0] < 0.1 < t[4]  # hard prompts get a smaller tau than p = 1/2, easy ones a larger one
    perm = torch.tensor([0, 4, 1, 2, 5, 6, 3, 7, 8, 9, 10, 11])  # the same groups, by uid, interleaved
    ids = torch.tensor([5, 9, 2])[perm // 4]
    t2 = sequence_tau(r[perm], tau=0.1, schedule="mean-reward", low=-1.0, high=1.0, group_ids=ids)
    torch.testing.assert_close(t2, t[perm], rtol=1e-12, atol=0)
    assert sequence_tau(r, tau=0.1, schedule="none", low=-1.0, high=1.0, group_size=4) == 0.1
    with pytest.raises(ValueError, match="tau_schedule"):
        sequence_tau(r, tau=0.1, schedule="cosine", low=-1.0, high=1.0, group_size=4)


def per_sequence_reference(lp, old, adv, mask, tau):
    """float64, one sequence at a time: (A_i - tau_i*Delta_i)^2 / (2 tau_i) / len_i, mean over non-empty rows."""
    terms = []
    for i in range(lp.shape[0]):
        n = int(mask[i].sum())
        if n:
            d = (lp[i] - old[i])[mask[i]].sum()
            terms.append((adv[i] - tau[i] * d) ** 2 / (2 * tau[i]) / n)
    return torch.stack(terms).sum() / len(terms)


def test_pmd_loss_tensor_tau_matches_reference():
    g = torch.Generator().manual_seed(1)
    lp = (-torch.rand(5, 7, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = -torch.rand(5, 7, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(5, 7, generator=g) > 0.3
    mask[3] = False
    adv = torch.randn(5, generator=g, dtype=torch.float64)
    tau = torch.tensor([0.01, 0.3, 0.3, 2.0, 0.07], dtype=torch.float64)
    loss, met = fastpmd.pmd_loss(lp, old, adv, mask, tau=tau)
    (gl,) = torch.autograd.grad(loss, lp)
    lp2 = lp.detach().clone().requires_grad_()
    ref = per_sequence_reference(lp2, old, adv, mask, tau)
    (gr,) = torch.autograd.grad(ref, lp2)
    torch.testing.assert_close(loss, ref, rtol=1e-13, atol=0)
    torch.testing.assert_close(gl, gr, rtol=1e-12, atol=1e-15)
    # a constant tensor equals the float
    same, _ = fastpmd.pmd_loss(lp, old, adv, mask, tau=torch.full((5,), 0.3, dtype=torch.float64))
    torch.testing.assert_close(same, fastpmd.pmd_loss(lp, old, adv, mask, tau=0.3)[0], rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="tau"):
        fastpmd.pmd_loss(lp, old, adv, mask, tau=tau[:4])
    # the released code's metrics: ppo_kl = mean(-Delta/len), exp(Delta) stats, over non-empty rows
    d = torch.where(mask, lp.detach() - old, 0.0).sum(-1)
    n = mask.sum(-1)
    keep = n > 0
    torch.testing.assert_close(met["ppo_kl"].double(), (-d[keep] / n[keep]).mean(), rtol=1e-6, atol=1e-7)
    ratio = torch.exp(d[keep])
    for k, v in (("mean", ratio.mean()), ("min", ratio.min()), ("max", ratio.max())):
        torch.testing.assert_close(met[f"seq_ratio_{k}"].double(), v, rtol=1e-6, atol=0)


@pytest.mark.parametrize("chunk", [None, 11])  # 11: the two-pass fallback
def test_fused_tensor_tau_matches_reference(chunk):
    h, w, b, t, m, old, adv = make(torch.float64)
    tau = torch.tensor([0.02, 0.5, 0.1, 0.1, 1.3, 0.05], dtype=torch.float64)
    got = losses_and_grads(lambda h_, w_, b_: fastpmd.fused_linear_pmd_loss(
        h_, w_, t, m, old, adv, tau=tau, chunk_size=chunk, backend="torch"), h, w, b)

    def ref_fn(h_, w_, b_):
        lp = fastpmd.linear_logprobs(h_, w_, t, mask=m, backend="naive")
        return per_sequence_reference(lp, old, adv, m, tau), {}
    ref = losses_and_grads(ref_fn, h, w, b)
    for x, y in zip(got[:3], ref[:3]):
        torch.testing.assert_close(x, y, atol=1e-11, rtol=1e-10)
    assert {"ppo_kl", "seq_ratio_min", "seq_ratio_mean", "seq_ratio_max"} <= set(got[4])
