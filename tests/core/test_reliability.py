"""Reliability of the library on edge input: empty batches, parameters that would give NaN/inf, one mask rule,
devices, the opt-in finite-value checks, and fastpmd.theory's argument errors."""
import math
import os

import pytest
import torch

import fastpmd
from fastpmd import theory

B0 = dict(lp=torch.zeros(0, 3), old=torch.zeros(0, 3), adv=torch.zeros(0), mask=torch.zeros(0, 3, dtype=torch.bool))
LOSSES = {
    "pmd": lambda lp, old, a, m: fastpmd.pmd_loss(lp, old, a, m, tau=0.1),
    "pmd-nolen": lambda lp, old, a, m: fastpmd.pmd_loss(lp, old, a, m, tau=0.1, length_norm=False),
    **{f"grpo-{t}": (lambda t: lambda lp, old, a, m: fastpmd.grpo_loss(lp, old, a, m, loss_type=t))(t)
       for t in ("grpo", "bnpo", "dr_grpo", "dapo")},
    "grpo-kl": lambda lp, old, a, m: fastpmd.grpo_loss(lp, old, a, m, beta=0.1, ref_logprobs=old),
    "gspo": lambda lp, old, a, m: fastpmd.gspo_loss(lp, old, a, m),
    "pg": lambda lp, old, a, m: fastpmd.pg_loss(lp, old, a, m),
    **{f"compute-{n}": (lambda n: lambda lp, old, a, m: fastpmd.compute_loss(fastpmd.LossConfig(name=n), lp, old,
                                                                           a, m))(n)
       for n in fastpmd.LOSS_NAMES},
}


# ------------------------------------------------------------------------------------------- empty batch
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_empty_batch_every_loss(name):
    lp = B0["lp"].clone().requires_grad_()
    loss, metrics = LOSSES[name](lp, B0["old"], B0["adv"], B0["mask"])
    assert loss.item() == 0 and loss.grad_fn is not None
    loss.backward()
    assert lp.grad.shape == (0, 3)
    assert all(torch.isfinite(v) for v in metrics.values()), metrics


def test_fully_masked_grpo_is_zero():
    lp = torch.zeros(2, 3, requires_grad=True)
    for t in ("grpo", "bnpo", "dr_grpo", "dapo"):
        loss, met = fastpmd.grpo_loss(lp, lp.detach(), torch.ones(2), torch.zeros(2, 3, dtype=torch.bool), loss_type=t)
        assert loss.item() == 0 and all(torch.isfinite(v) for v in met.values())


@pytest.mark.parametrize("backend", ["naive", "torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1"
                                                          else []))
def test_empty_batch_fused_and_logprobs(backend):
    h = torch.zeros(0, 3, 4, requires_grad=True)
    w = torch.randn(5, 4, requires_grad=True)
    t = torch.zeros(0, 3, dtype=torch.long)
    m = torch.zeros(0, 3, dtype=torch.bool)
    loss, met = fastpmd.fused_linear_pmd_loss(h, w, t, m, torch.zeros(0, 3), torch.zeros(0), tau=0.1,
                                              backend=backend)
    assert loss.item() == 0 and loss.grad_fn is not None
    loss.backward()
    assert h.grad.shape == h.shape and w.grad.abs().sum() == 0
    assert all(torch.isfinite(v) for v in met.values())
    lp = fastpmd.linear_logprobs(h, w, t, mask=m, backend=backend)
    assert lp.shape == (0, 3)
    lp, ent = fastpmd.linear_logprobs(h, w, t, backend=backend, return_entropy=True)  # no mask at all
    (lp.sum() + ent.sum()).backward()
    assert lp.shape == ent.shape == (0, 3)


# ------------------------------------------------------------------------------- parameters -> NaN/inf
lp2, m2, a2 = torch.randn(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.randn(2)
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("kw,match", [
    (dict(epsilon_high=NAN), "epsilon_high"), (dict(epsilon_low=NAN), "epsilon_low"),
    (dict(epsilon_low=-0.1), "epsilon_low"), (dict(epsilon_high=-1.0), "epsilon_high"),
    (dict(epsilon_high=INF), "epsilon_high"),
    (dict(beta=NAN, ref_logprobs=lp2), "beta"), (dict(beta=-0.1, ref_logprobs=lp2), "beta"),
    (dict(epsilon_high="0.2"), "epsilon_high"),
    (dict(num_items=0), "num_items"), (dict(num_items=NAN, loss_type="dapo"), "num_items"),
    (dict(max_completion_length=0, loss_type="dr_grpo"), "max_completion_length"),
])
def test_grpo_parameters(kw, match):
    with pytest.raises(ValueError, match=match):
        fastpmd.grpo_loss(lp2, lp2, a2, m2, **kw)
    if "loss_type" not in kw and "num_items" not in kw:
        with pytest.raises(ValueError, match=match):
            fastpmd.gspo_loss(lp2, lp2, a2, m2, **kw)


@pytest.mark.parametrize("tau", [1e-40, 0.0, -1.0, NAN, INF, "0.1", None, True])
def test_tau_rejected_everywhere(tau):
    with pytest.raises(ValueError, match="tau"):
        fastpmd.pmd_loss(lp2, lp2, a2, m2, tau=tau)
    with pytest.raises(ValueError, match="tau"):
        fastpmd.LossConfig(tau=tau)
    with pytest.raises(ValueError, match="tau"):
        fastpmd.advantages(torch.tensor([1.0, 0.0]), group_size=2, estimator="partition", tau=tau)


def test_small_valid_tau_is_finite():
    tau = fastpmd.TAU_MIN
    lp = torch.randn(2, 3, requires_grad=True)
    loss, met = fastpmd.pmd_loss(lp, lp.detach() + 1.0, torch.tensor([1.0, -1.0]), m2, tau=tau)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all() and all(torch.isfinite(v) for v in met.values())
    a = fastpmd.advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), group_size=4, estimator="partition_loo", tau=tau)
    assert torch.isfinite(a).all()


@pytest.mark.parametrize("eps", [0.0, -1e-4, NAN, INF])
def test_grpo_advantage_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        fastpmd.advantages(torch.ones(4), group_size=2, estimator="grpo", eps=eps)


@pytest.mark.parametrize("bad", [NAN, -1.0, 0.0, INF])
@pytest.mark.parametrize("which", ["pmd", "pg", "dapo"])
def test_tensor_counts_checked_under_the_switch(which, bad):
    n = torch.tensor(bad)
    call = {"pmd": lambda: fastpmd.pmd_loss(lp2, lp2, a2, m2, tau=0.1, num_sequences=n),
            "pg": lambda: fastpmd.pg_loss(lp2, lp2, a2, m2, num_sequences=n),
            "dapo": lambda: fastpmd.grpo_loss(lp2, lp2, a2, m2, loss_type="dapo", num_items=n)}[which]
    name = "num_items" if which == "dapo" else "num_sequences"
    with fastpmd.finite_checks():
        with pytest.raises(ValueError, match=name):
            call()
    with pytest.raises(ValueError, match=name):  # the same value as a Python number: always checked
        {"pmd": lambda: fastpmd.pmd_loss(lp2, lp2, a2, m2, tau=0.1, num_sequences=bad),
         "pg": lambda: fastpmd.pg_loss(lp2, lp2, a2, m2, num_sequences=bad),
         "dapo": lambda: fastpmd.grpo_loss(lp2, lp2, a2, m2, loss_type="dapo", num_items=bad)}[which]()


@pytest.mark.parametrize("kw,match", [
    (dict(epsilon_low=-1.0), "epsilon_low"), (dict(epsilon_high=NAN), "epsilon_high"),
    (dict(length_norm=-1), "length_norm"), (dict(length_norm=0.0), "length_norm"),
    (dict(length_norm="yes"), "length_norm"), (dict(beta=NAN), "beta"), (dict(beta=-1.0), "beta"),
    (dict(max_completion_length=0), "max_completion_length"),
    (dict(max_completion_length=2.5), "max_completion_length"),
])
def test_loss_config_post_init(kw, match):
    with pytest.raises(ValueError, match=match):
        fastpmd.LossConfig(**kw)


def test_compute_loss_needs_a_config():
    with pytest.raises(ValueError, match="LossConfig"):
        fastpmd.compute_loss("pmd-mean", lp2, lp2, a2, m2)


# ---------------------------------------------------------------------------------------- one mask rule
def _head(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 4, generator=g), torch.randn(5, 4, generator=g), torch.randint(0, 5, (2, 3), generator=g)


def _fused(mask):
    h, w, t = _head()
    return fastpmd.fused_linear_pmd_loss(h, w, t, mask, torch.zeros(2, 3), torch.ones(2), tau=0.1)


def _logprobs(mask):
    return fastpmd.linear_logprobs(*_head(), mask=mask)


MASK_USERS = {"fused": _fused, "logprobs": _logprobs,
              "pmd": lambda m: fastpmd.pmd_loss(lp2, lp2, a2, m, tau=0.1),
              "grpo": lambda m: fastpmd.grpo_loss(lp2, lp2, a2, m), "pg": lambda m: fastpmd.pg_loss(lp2, lp2, a2, m)}


@pytest.mark.parametrize("user", sorted(MASK_USERS))
def test_one_mask_rule(user):
    fn = MASK_USERS[user]
    with pytest.raises(ValueError, match=r"mask must be bool or integer 0/1, got torch.float32"):
        fn(torch.full((2, 3), 0.5))
    a, b = fn(torch.tensor([[1, 1, 0], [1, 0, 0]])), fn(torch.tensor([[True, True, False], [True, False, False]]))
    a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ devices
def test_other_device_is_named():
    meta = torch.device("meta")
    with pytest.raises(ValueError, match="mask"):
        fastpmd.pmd_loss(lp2, lp2, a2, m2.to(meta), tau=0.1)
    with pytest.raises(ValueError, match="old_logprobs"):
        fastpmd.pmd_loss(lp2, lp2.to(meta), a2, m2, tau=0.1)
    with pytest.raises(ValueError, match="advantages"):
        fastpmd.grpo_loss(lp2, lp2, a2.to(meta), m2)
    with pytest.raises(ValueError, match="ref_logprobs"):
        fastpmd.grpo_loss(lp2, lp2, a2, m2, beta=0.1, ref_logprobs=lp2.to(meta))
    with pytest.raises(ValueError, match="old_logprobs"):
        fastpmd.pg_loss(lp2, lp2.to(meta), a2, m2)
    with pytest.raises(ValueError, match="num_sequences"):
        fastpmd.pmd_loss(lp2, lp2, a2, m2, tau=0.1, num_sequences=torch.tensor(2.0, device=meta))
    fastpmd.pmd_loss(lp2, lp2, a2, m2, tau=0.1, num_sequences=torch.tensor(2.0))  # a 0-d CPU count mixes anywhere
    h, w, t = torch.randn(2, 3, 4), torch.randn(5, 4), torch.randint(0, 5, (2, 3))
    for name, args in {"mask": (m2.to(meta), lp2, a2), "old_logprobs": (m2, lp2.to(meta), a2),
                       "advantages": (m2, lp2, a2.to(meta))}.items():
        with pytest.raises(ValueError, match=name):
            fastpmd.fused_linear_pmd_loss(h, w, t, *args, tau=0.1)
    with pytest.raises(ValueError, match="mask"):
        fastpmd.linear_logprobs(h, w, t, mask=m2.to(meta))
    with pytest.raises(ValueError, match="weight"):
        fastpmd.linear_logprobs(h, w.to(meta), t)


# -------------------------------------------------------------------------------------- finite checks
def _nan_at(x, idx=(1, 2)):
    x = x.clone()
    x[idx] = float("nan")
    return x


@pytest.mark.parametrize("name", ["hidden", "weight", "old_logprobs", "advantages"])
def test_finite_checks_name_the_tensor(name, monkeypatch):
    kw = dict(hidden=torch.randn(2, 3, 4), weight=torch.randn(5, 4), old_logprobs=torch.zeros(2, 3),
              advantages=torch.ones(2))
    kw[name] = _nan_at(kw[name], (1, 2) if kw[name].dim() > 1 else (1,))
    t = torch.randint(0, 5, (2, 3))
    call = lambda: fastpmd.fused_linear_pmd_loss(kw["hidden"], kw["weight"], t, m2, kw["old_logprobs"],  # noqa
                                                 kw["advantages"], tau=0.1)
    loss, _ = call()  # off by default: no sync, the NaN flows through
    assert not torch.isfinite(loss)
    with fastpmd.finite_checks():
        with pytest.raises(ValueError, match=rf"{name} holds \d+ non-finite"):
            call()
    monkeypatch.setenv("FASTPMD_CHECK_FINITE", "1")
    with pytest.raises(ValueError, match=name):
        call()
    with fastpmd.finite_checks(False):  # the context manager overrides the environment
        call()


def test_finite_checks_losses_and_logprobs():
    with fastpmd.finite_checks():
        for name, call in {
            "logprobs": lambda: fastpmd.pmd_loss(_nan_at(lp2), lp2, a2, m2, tau=0.1),
            "old_logprobs": lambda: fastpmd.grpo_loss(lp2, _nan_at(lp2), a2, m2),
            "advantages": lambda: fastpmd.pg_loss(lp2, lp2, torch.tensor([1.0, float("inf")]), m2),
            "ref_logprobs": lambda: fastpmd.grpo_loss(lp2, lp2, a2, m2, beta=0.1, ref_logprobs=_nan_at(lp2)),
            "hidden": lambda: fastpmd.linear_logprobs(_nan_at(torch.randn(2, 3, 4), (0, 0, 0)), torch.randn(5, 4),
                                                      torch.randint(0, 5, (2, 3))),
        }.items():
            with pytest.raises(ValueError, match=name):
                call()
        # masked positions may hold anything (old log-probs of padding are often -inf)
        old = torch.where(m2, lp2, float("-inf"))
        m = m2.clone()
        m[1, 2] = False
        old[1, 2] = float("-inf")
        loss, _ = fastpmd.pmd_loss(lp2, old, a2, m, tau=0.1)
        assert torch.isfinite(loss)


# --------------------------------------------------------------------------------------------- theory
@pytest.mark.parametrize("call,match", [
    (lambda: theory.pmd_mean_update([0.5, 0.5], [1.0, 0.0], "abc"), "tau"),
    (lambda: theory.pmd_mean_update([0.5, 0.5], [1.0, 0.0], None), "tau"),
    (lambda: theory.pmd_part_update([0.5, 0.5], [1.0, 0.0], [0.1, 0.2]), "tau"),
    (lambda: theory.mean_baseline([]), "rewards"),
    (lambda: theory.partition_baseline([], 0.1), "rewards"),
    (lambda: theory.mean_baseline([[], []]), "rewards"),
    (lambda: theory.pmd_mean_update([], [], 0.1), "pi"),
    (lambda: theory.binary_baseline_errors(0.5, 0, 0.1), "n"),
    (lambda: theory.binary_baseline_errors(0.5, 2.5, 0.1), "n"),
    (lambda: theory.binary_baseline_errors(1.5, 4, 0.1), "p"),
    (lambda: theory.binary_baseline_errors(float("nan"), 4, 0.1), "p"),
    (lambda: theory.binary_baseline_errors(0.5, 4, 0.1, seeds=0), "seeds"),
    (lambda: theory.pmd_mean_update(["a", "b"], [1.0, 0.0], 0.1), "pi"),
])
def test_theory_errors(call, match):
    with pytest.raises(ValueError, match=rf"\b{match}\b") as e:
        call()
    if match == "p":
        assert "pi" not in str(e.value)


def test_theory_edge_values_still_work():
    assert math.isclose(theory.binary_baseline_errors(1.0, 4, 0.1, seeds=3)["mean"].max(), 0.0)
    assert theory.mean_baseline([1.0]) == 1.0
