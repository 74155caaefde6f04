"""Reliability, third round (issue 24, library): no inf from finite input (stale GRPO/GSPO ratios and their
metrics), per-sequence tau [B] and weights checked like every other option (cheap checks always, values under the
finite switch), and the tau schedule / rollout-correction / compute_loss argument errors."""
import pytest
import torch

import fastpmd
from fastpmd._checks import NonFiniteInputError

META = torch.device("meta")


def _stale(B=2, T=3, adv=(-1.0, 1.0), seed=0):
    """Log-probs [B, T] with one stale token in row 0 (old = -100: the log-ratio is ~ +100, exp overflows fp32)."""
    g = torch.Generator().manual_seed(seed)
    lp = (-torch.rand(B, T, generator=g)).requires_grad_()
    old = lp.detach() - 0.1 * torch.rand(B, T, generator=g)
    old[0, 1] = -100.0
    return lp, old, torch.tensor(adv), torch.ones(B, T, dtype=torch.bool)


STALE = {
    "grpo": {}, "grpo-delta": {"delta": 2.0}, "grpo-bnpo": {"loss_type": "bnpo"},
    "grpo-kl-bias": {"beta": 0.04, "bias_correction_kl": True},
    "gspo": {"importance_sampling_level": "sequence"},
    "gspo-delta": {"importance_sampling_level": "sequence", "delta": 2.0},
    "gspo-kl-bias": {"importance_sampling_level": "sequence", "beta": 0.04, "bias_correction_kl": True},
}


@pytest.mark.parametrize("name", sorted(STALE))
@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_stale_token_gives_finite_loss_grad_and_metrics(name, sign):
    lp, old, adv, mask = _stale(adv=(sign, -sign))
    kw = dict(STALE[name])
    if kw.get("beta"):
        kw["ref_logprobs"] = lp.detach() - 0.05
    if kw.get("importance_sampling_level") == "sequence":  # one token: the sequence ratio is exp(~100) too
        lp, old, mask = lp[:, :1].detach().requires_grad_(), old[:, 1:2], mask[:, :1]
        kw.setdefault("epsilon_low", 3e-4), kw.setdefault("epsilon_high", 4e-4)
        if "ref_logprobs" in kw:
            kw["ref_logprobs"] = kw["ref_logprobs"][:, :1]
    loss, metrics = fastpmd.grpo_loss(lp, old, adv, mask, **kw)
    assert torch.isfinite(loss), loss
    loss.backward()
    assert torch.isfinite(lp.grad).all(), lp.grad
    bad = {k: v for k, v in metrics.items() if not torch.isfinite(v)}
    assert not bad, bad


def test_pmd_seq_ratio_metric_finite_for_stale_token():
    lp, old, adv, mask = _stale()
    _, metrics = fastpmd.pmd_loss(lp, old, adv, mask, tau=0.1)
    assert all(torch.isfinite(v) for v in metrics.values()), metrics


def test_capped_ratio_leaves_ordinary_values_exact():
    """Below the cap (ratio <= e^40) the A < 0 branch is the exact unclipped -ratio * A, value and gradient."""
    lp = torch.tensor([[30.0, 0.0]], dtype=torch.float64, requires_grad=True)
    loss, m = fastpmd.grpo_loss(lp, torch.zeros(1, 2, dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64),
                                torch.tensor([[True, False]]))
    torch.testing.assert_close(loss, torch.exp(torch.tensor(30.0, dtype=torch.float64)), rtol=1e-12, atol=0)
    loss.backward()
    torch.testing.assert_close(lp.grad[0, 0], loss.detach(), rtol=1e-12, atol=0)


# --------------------------------------------------------------------------------- per-sequence tau [B]
lp2, a2, m2 = torch.zeros(2, 3), torch.tensor([1.0, -1.0]), torch.ones(2, 3, dtype=torch.bool)
H, W, TG = torch.randn(2, 3, 4), torch.randn(5, 4), torch.randint(0, 5, (2, 3))
TAU_USERS = {
    "pmd": lambda tau=0.1, w=None: fastpmd.pmd_loss(lp2, lp2, a2, m2, tau=tau, weights=w),
    "fused": lambda tau=0.1, w=None: fastpmd.fused_linear_pmd_loss(H, W, TG, m2, lp2, a2, tau=tau, weights=w),
    "compute": lambda tau=0.1, w=None: fastpmd.compute_loss(fastpmd.LossConfig(), lp2, lp2, a2, m2, tau=tau,
                                                           weights=w),
}


@pytest.mark.parametrize("user", sorted(TAU_USERS))
def test_sequence_tau_cheap_checks_always(user):
    fn = TAU_USERS[user]
    with pytest.raises(ValueError, match="tau is on meta"):
        fn(tau=torch.full((2,), 0.1, device=META))
    with pytest.raises(ValueError, match="tau has 3 entries"):
        fn(tau=torch.full((3,), 0.1))
    with pytest.raises(ValueError, match="tau must be a floating-point tensor"):
        fn(tau=torch.ones(2, dtype=torch.long))


@pytest.mark.parametrize("user", sorted(TAU_USERS))
@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), float("inf"), 1e-9])
def test_sequence_tau_values_checked_under_the_switch(user, bad):
    tau = torch.tensor([0.1, bad])
    with fastpmd.finite_checks(), pytest.raises(ValueError, match=r"tau(\[1\] =| holds 1 non-finite)"):
        TAU_USERS[user](tau=tau)
    with fastpmd.finite_checks():
        loss, _ = TAU_USERS[user](tau=torch.tensor([0.1, 0.2]))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("user", sorted(TAU_USERS))
def test_sequence_weights_checks(user):
    fn = TAU_USERS[user]
    with pytest.raises(ValueError, match="weights is on meta"):
        fn(w=torch.ones(2, device=META))
    with pytest.raises(ValueError, match="weights must have the shape"):
        fn(w=torch.ones(3))
    for bad, err in ((float("nan"), NonFiniteInputError), (-1.0, ValueError)):
        with fastpmd.finite_checks(), pytest.raises(err, match="weights"):
            fn(w=torch.tensor([1.0, bad]))
    with fastpmd.finite_checks():
        assert torch.isfinite(fn(w=torch.tensor([1.0, 0.5]))[0])


def test_token_weights_checks_grpo():
    with pytest.raises(ValueError, match="weights is on meta"):
        fastpmd.grpo_loss(lp2, lp2, a2, m2, weights=torch.ones(2, 3, device=META))
    m = torch.tensor([[True, True, False], [True, False, False]])
    w = torch.ones(2, 3)
    w[0, 2] = float("nan")  # masked position: never used
    with fastpmd.finite_checks():
        fastpmd.grpo_loss(lp2, lp2, a2, m, weights=w)
        for bad, err in ((float("nan"), NonFiniteInputError), (-1.0, ValueError)):
            w[1, 0] = bad
            with pytest.raises(err, match="weights"):
                fastpmd.grpo_loss(lp2, lp2, a2, m, weights=w)
            with pytest.raises(err, match="weights"):
                fastpmd.grpo_loss(lp2, lp2, a2, m, weights=w[:, :1])


# ------------------------------------------------------------------------ tau schedule, correction, dispatch
SCHED = fastpmd.LossConfig(tau_schedule="mean-reward")


def test_loss_tau_group_size_must_divide():
    with pytest.raises(ValueError, match="group_size=3 does not divide the batch of 4"):
        fastpmd.loss_tau(SCHED, torch.tensor([0.0, 1.0, 1.0, 0.0]), group_size=3)
    with pytest.raises(ValueError, match="exactly one of group_size and group_ids"):
        fastpmd.loss_tau(SCHED, torch.tensor([0.0, 1.0]))


def test_loss_tau_rejects_nan_reward():
    with pytest.raises(ValueError, match="rewards must be finite"):
        fastpmd.loss_tau(SCHED, torch.tensor([0.0, float("nan"), 1.0, 0.0]), group_size=2)


def test_tis_weights_nan_rollout_logprob_under_the_switch():
    old, roll, mask = torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    roll[1, 2] = float("nan")
    with fastpmd.finite_checks(), pytest.raises(NonFiniteInputError, match="rollout_logprobs"):
        fastpmd.truncated_is_weights(old, roll, mask)
    mask[1, 2] = False  # a masked NaN is never read
    with fastpmd.finite_checks():
        for level in ("token", "sequence"):
            assert torch.isfinite(fastpmd.truncated_is_weights(old, roll, mask, level=level)).all()


@pytest.mark.parametrize("p", [1.5, -0.1, float("nan")])
def test_tau_for_logodds_step_rejects_p_outside_0_1(p):
    from fastpmd.tau_schedule import tau_for_logodds_step
    with pytest.raises(ValueError, match=r"p must lie in \[0, 1\]"):
        tau_for_logodds_step(torch.tensor([0.5, p]), 1.0)
    with pytest.raises(ValueError, match=r"p must lie in \[0, 1\]"):
        tau_for_logodds_step(p, 1.0)
    assert torch.isfinite(tau_for_logodds_step(0.25, 1.0))


def test_compute_loss_bad_config_is_value_error():
    with pytest.raises(ValueError, match="LossConfig"):
        fastpmd.compute_loss("pmd-mean", lp2, lp2, a2, m2)
