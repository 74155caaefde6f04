"""fastpmd.theory: the exact PMD-mean (Lambert W) and PMD-part updates, their estimators, the toy figures."""
import os

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import softmax

from fastpmd.theory import (
    PMDMeanUpdate,
    PMDPartUpdate,
    binary_baseline_errors,
    mean_baseline,
    mixed_kl_chi2_objective,
    partition_baseline,
    pmd_mean_objective,
    pmd_mean_update,
    pmd_part_update,
    tau_log_partition,
)
from fastpmd.theory.sim import METHODS, TabularConfig, simulate_tabular


def _random_case(seed, k=6, lo=-1.0, hi=1.0):
    rng = np.random.default_rng(seed)
    pi = rng.dirichlet(np.ones(k))
    r = rng.uniform(lo, hi, k)
    return pi, r


def _kl(p, q):
    m = p > 0
    return float(np.sum(p[m] * (np.log(p[m]) - np.log(q[m]))))


def _simplex_perturbations(q, rng, count=300, scale=1e-3):
    """Feasible perturbations q + eps*d of a distribution q (sum d = 0, q + eps*d >= 0)."""
    for _ in range(count):
        d = rng.normal(size=q.shape)
        d -= d.mean()
        eps = scale * min(1.0, 0.5 * np.min(np.where(d < 0, q / -d, np.inf)))
        yield q + eps * d


# ------------------------------------------------------------------------------------------- reference values
@pytest.mark.parametrize("p, expected", [(0.01, 0.379), (0.05, 0.741), (0.2, 0.986)])
def test_reference_numbers_binary_tau005(p, expected):
    upd = pmd_mean_update([p, 1 - p], [1.0, 0.0], 0.05)
    assert isinstance(upd, PMDMeanUpdate)
    assert upd.pi[0] == pytest.approx(expected, abs=5e-4)
    assert upd.pi.sum() == pytest.approx(1.0, abs=1e-12)
    # the KL / partition solution jumps to ~1
    assert pmd_part_update([p, 1 - p], [1.0, 0.0], 0.05).pi[0] > 0.9999


# ---------------------------------------------------------------------------------- closed form = argmin
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tau", [0.05, 0.3])
def test_closed_form_equals_numerical_minimisation(seed, tau):
    pi, r = _random_case(seed)
    upd = pmd_mean_update(pi, r, tau)
    obj = lambda z: pmd_mean_objective(pi, r, tau, softmax(z))  # noqa: E731
    best = None
    for z0 in (np.log(pi), np.zeros_like(pi), np.log(pi) + r / tau):
        res = minimize(obj, z0, method="BFGS", options={"gtol": 1e-12, "maxiter": 10_000})
        if best is None or res.fun < best.fun:
            best = res
    closed = pmd_mean_objective(pi, r, tau, upd.pi)
    assert closed <= best.fun + 1e-12
    np.testing.assert_allclose(upd.pi, softmax(best.x), atol=1e-4)
    rng = np.random.default_rng(seed)
    for q in _simplex_perturbations(upd.pi, rng):
        assert pmd_mean_objective(pi, r, tau, q) >= closed - 1e-13


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_solves_mixed_kl_chi2_subproblem(seed, tau):
    pi, r = _random_case(seed + 10)
    upd = pmd_mean_update(pi, r, tau)
    assert upd.chi2_coef == pytest.approx(tau * upd.lam / 2)
    value = mixed_kl_chi2_objective(pi, r, tau, upd.chi2_coef, upd.pi)
    # a numerical maximiser (BFGS on logits) does no better and lands on the same policy
    neg = lambda z: -mixed_kl_chi2_objective(pi, r, tau, upd.chi2_coef, softmax(z))  # noqa: E731
    res = minimize(neg, np.log(pi), method="BFGS", options={"gtol": 1e-12, "maxiter": 10_000})
    assert value >= -res.fun - 1e-12
    big = upd.pi > 1e-2  # BFGS on logits is slow to pin down tiny probabilities; compare the bulk
    np.testing.assert_allclose(upd.pi[big], softmax(res.x)[big], atol=1e-3)
    # KKT of the strictly concave problem at an interior point: r - tau*log u - 2*chi2_coef*u is constant
    u = upd.pi / pi
    kkt = r - tau * np.log(u) - 2 * upd.chi2_coef * u
    assert np.ptp(kkt) < 1e-10
    # the objective is concave in pi': no feasible perturbation improves it (local = global maximum)
    rng = np.random.default_rng(seed)
    for q in _simplex_perturbations(upd.pi, rng):
        assert mixed_kl_chi2_objective(pi, r, tau, upd.chi2_coef, q) <= value + 1e-13
    # ... while the plain KL problem (chi2_coef = 0) is solved by PMD-part instead
    part = pmd_part_update(pi, r, tau)
    assert mixed_kl_chi2_objective(pi, r, tau, 0.0, part.pi) > mixed_kl_chi2_objective(pi, r, tau, 0.0, upd.pi)


@pytest.mark.parametrize("seed", range(5))
def test_stationarity_and_lambda_identities(seed):
    pi, r = _random_case(seed, k=8)
    tau = 0.1
    upd = pmd_mean_update(pi, r, tau)
    u = upd.pi / pi
    a = r - pi @ r
    np.testing.assert_allclose(upd.advantage, a, atol=1e-14)
    np.testing.assert_allclose(tau * np.log(u) + tau * upd.lam * u, a, atol=1e-10)  # tau log u + tau lam u = A
    np.testing.assert_allclose(upd.log_ratio, np.log(u), atol=1e-10)
    assert upd.lam == pytest.approx(_kl(pi, upd.pi), rel=1e-8)  # lam = KL(pi || pi')
    assert upd.lam > 0


# ------------------------------------------------------------------------------------------ special cases
def test_equal_rewards_leave_pi_unchanged():
    pi = np.array([0.1, 0.2, 0.3, 0.4])
    for c in (0.0, 0.3, -1.0):
        upd = pmd_mean_update(pi, np.full(4, c), 0.01)
        np.testing.assert_array_equal(upd.pi, pi)
        np.testing.assert_array_equal(upd.log_ratio, 0.0)
        assert upd.lam == 0.0 and upd.chi2_coef == 0.0
        np.testing.assert_allclose(pmd_part_update(pi, np.full(4, c), 0.01).pi, pi, rtol=1e-14)
    # a zero-probability action with a different reward does not count: still no update, and it stays at 0
    upd = pmd_mean_update([0.3, 0.7, 0.0], [0.5, 0.5, 1.0], 0.05)
    np.testing.assert_array_equal(upd.pi, [0.3, 0.7, 0.0])
    # nearly equal rewards: a tiny, smooth update
    upd = pmd_mean_update([0.3, 0.7], [0.3, 0.3 + 1e-9], 1e-3)
    assert np.all(np.abs(upd.log_ratio) < 1e-6) and upd.lam < 1e-12


@pytest.mark.parametrize("tau", [0.01, 0.05, 0.2])
def test_binary_small_p_update_smaller_than_part(tau):
    p = np.array([0.001, 0.01, 0.05, 0.1])
    pi = np.stack([p, 1 - p], -1)
    r = np.broadcast_to([1.0, 0.0], pi.shape)
    m, k = pmd_mean_update(pi, r, tau), pmd_part_update(pi, r, tau)
    assert isinstance(k, PMDPartUpdate)
    assert np.all(m.log_ratio[:, 0] < k.log_ratio[:, 0])  # less mass moved to the correct answer
    assert np.all(m.log_ratio[:, 1] > k.log_ratio[:, 1])  # the wrong answer pushed down less
    assert np.all(m.pi[:, 0] > p)  # but it does improve
    for i in range(len(p)):
        assert _kl(m.pi[i], pi[i]) < _kl(k.pi[i], pi[i])


def test_support_is_kept_and_inputs_checked():
    upd = pmd_mean_update([0.5, 0.0, 0.5], [1.0, 5.0, 0.0], 0.1)
    assert upd.pi[1] == 0.0 and upd.pi.sum() == pytest.approx(1.0)
    ref = pmd_mean_update([0.5, 0.5], [1.0, 0.0], 0.1)
    np.testing.assert_allclose(upd.pi[[0, 2]], ref.pi, rtol=1e-12)
    with pytest.raises(ValueError):
        pmd_mean_update([0.5, 0.5], [1.0, 0.0], 0.0)
    with pytest.raises(ValueError):
        pmd_mean_update([0.5, 0.6], [1.0, 0.0], 0.1)
    with pytest.raises(ValueError):
        pmd_mean_update([0.5, 0.5], [1.0, np.nan], 0.1)


# ------------------------------------------------------------------------------------------------ numerics
@pytest.mark.parametrize("tau", [0.01, 0.001])
def test_stable_small_tau_batched(tau):
    rng = np.random.default_rng(0)
    pi = rng.dirichlet(np.full(50, 0.3), size=20)
    pi = np.maximum(pi, 1e-300)
    pi /= pi.sum(-1, keepdims=True)
    r = rng.uniform(-1, 1, pi.shape)
    r[0] = np.where(np.arange(50) == 3, 1.0, -1.0)  # binary +-1
    upd = pmd_mean_update(pi, r, tau)
    assert upd.pi.shape == pi.shape and upd.lam.shape == (20,)
    assert np.all(np.isfinite(upd.log_ratio)) and np.all(np.isfinite(upd.lam)) and np.all(upd.lam > 0)
    np.testing.assert_allclose(upd.pi.sum(-1), 1.0, atol=1e-12)
    # stationarity in the stable form: A/tau - log u = lam * u  (both sides bounded by max A/tau)
    u_lam = upd.lam[:, None] * np.exp(upd.log_ratio)
    np.testing.assert_allclose(upd.advantage / tau - upd.log_ratio, u_lam, atol=1e-8 * (1 + 2 / tau))
    rows = [pmd_mean_update(pi[i], r[i], tau) for i in (0, 7)]
    for i, row in zip((0, 7), rows):
        np.testing.assert_allclose(row.pi, upd.pi[i], rtol=1e-10, atol=1e-300)
        assert row.lam == pytest.approx(upd.lam[i], rel=1e-10)


def test_near_deterministic_policies():
    # almost all mass on the best action: rounding in A = r - E[r]; must not hang or blow up
    for eps in (1e-12, 1e-20, 1e-200):
        upd = pmd_mean_update([1 - eps, eps], [1.0, 0.0], 0.05)
        assert upd.pi[0] == pytest.approx(1.0) and np.all(np.isfinite(upd.log_ratio))
        assert upd.log_ratio[1] == pytest.approx(-20.0, abs=1e-6)
        upd = pmd_mean_update([eps, 1 - eps], [1.0, 0.0], 0.05)
        assert 0 < upd.pi[0] < 1e-5 and np.all(np.isfinite(upd.log_ratio))  # e.g. 1e-12 -> 2.3e-6
        u = np.exp(upd.log_ratio)
        np.testing.assert_allclose(0.05 * upd.log_ratio + 0.05 * upd.lam * u, upd.advantage, atol=1e-12)


def test_pmd_part_update_closed_form():
    pi, r = _random_case(3)
    tau = 0.07
    upd = pmd_part_update(pi, r, tau)
    ref = pi * np.exp(r / tau)
    np.testing.assert_allclose(upd.pi, ref / ref.sum(), rtol=1e-12)
    assert upd.log_z == pytest.approx(np.log(pi @ np.exp(r / tau)), rel=1e-12)
    assert upd.baseline == pytest.approx(tau * upd.log_z)
    assert tau_log_partition(pi, r, tau) == pytest.approx(upd.baseline)
    # it is also the exact minimiser of its own regression with baseline tau*log Z (zero residual)
    np.testing.assert_allclose(r - upd.baseline - tau * upd.log_ratio, 0.0, atol=1e-12)
    # huge r/tau without overflow
    big = pmd_part_update([0.5, 0.5], [1.0, -1.0], 1e-4)
    assert np.all(np.isfinite(big.log_ratio)) and big.pi[0] == 1.0


def test_torch_inputs():
    torch = pytest.importorskip("torch")
    upd = pmd_mean_update(torch.tensor([0.01, 0.99]), torch.tensor([1.0, 0.0]), 0.05)
    assert isinstance(upd.pi, np.ndarray) and upd.pi[0] == pytest.approx(0.379, abs=5e-4)
    r = torch.tensor([[1.0, -1.0, -1.0, -1.0]])
    assert partition_baseline(r, 0.01, loo=True).shape == (1, 4)


# ---------------------------------------------------------------------------------- finite-sample estimators
def test_baseline_estimators():
    rng = np.random.default_rng(1)
    r = rng.uniform(-1, 1, (3, 8))
    tau = 0.3
    np.testing.assert_allclose(mean_baseline(r), r.mean(-1))
    np.testing.assert_allclose(partition_baseline(r, tau), tau * np.log(np.exp(r / tau).mean(-1)), rtol=1e-12)
    loo_m = mean_baseline(r, loo=True)
    loo_p = partition_baseline(r, tau, loo=True)
    for i in range(8):
        rest = np.delete(r, i, axis=1)
        np.testing.assert_allclose(loo_m[:, i], rest.mean(-1))
        np.testing.assert_allclose(loo_p[:, i], tau * np.log(np.exp(rest / tau).mean(-1)), rtol=1e-12)
    # the axis argument
    np.testing.assert_allclose(partition_baseline(r.T, tau, axis=0), partition_baseline(r, tau))
    np.testing.assert_allclose(partition_baseline(r.T, tau, loo=True, axis=0), loo_p.T)


def test_loo_partition_no_underflow_clamp():
    # tau = 0.01, rewards in {-1, 1}: a lone correct answer gets A = 1 - (-1) = 2, not ~0.18 (float32 clamp)
    r = np.array([1.0] + [-1.0] * 15)
    a = r - partition_baseline(r, 0.01, loo=True)
    assert a[0] == pytest.approx(2.0, abs=1e-12)
    assert np.all(a[1:] < 0)


def test_binary_baseline_errors():
    e = binary_baseline_errors(0.01, 16, 0.05, seeds=200, rng=0)
    assert e["mean"].shape == e["part"].shape == (200,)
    assert e["mean"].mean() < 0.05 < 0.5 < e["part"].mean()  # the mean is far easier to estimate at small p
    e = binary_baseline_errors([0.01, 0.2], 4096, 0.05, seeds=20, rng=0)
    assert e["mean"].shape == (2, 20) and e["part"].mean() < 0.05  # both consistent


# ----------------------------------------------------------------------------------------------- simulation
def test_tabular_simulation_smoke():
    cfg = TabularConfig(prompts=24, arms=16, steps=8, inner_steps=4)
    outs = {m: simulate_tabular(m, cfg) for m in METHODS}
    start = {o["reward"][0] for o in outs.values()}
    assert len(start) == 1  # same bandit and start for every method
    for o in outs.values():
        assert o["reward"].shape == (9,)
        assert np.all((o["reward"] >= 0) & (o["reward"] <= 1)) and np.all(o["kl"] >= -1e-12)
        assert o["reward"][-1] > o["reward"][0]
    assert outs["pmd-part-exact"]["reward"][-1] > 0.999  # tau = 0.05: the exact KL step is nearly greedy
    with pytest.raises(ValueError):
        simulate_tabular("grpo", cfg)


def test_theory_figures_quick(tmp_path):
    pytest.importorskip("matplotlib")
    from fastpmd.theory.figures import main

    assert main(["--out", str(tmp_path), "--quick", "--json", str(tmp_path / "summary.json")]) == 0
    for name in ("log_partition", "log_ratios", "estimation_error", "tabular"):
        path = tmp_path / f"theory_{name}.png"
        assert path.exists() and 0 < os.path.getsize(path) < 200_000
    assert (tmp_path / "summary.json").exists()


def test_theory_figures_names_the_extra_when_scipy_is_missing():
    """scipy is the `theory` extra, not a core dependency: without it the command says so in one line, exit 2."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['scipy'] = None; from fastpmd.cli import main; "
            "sys.exit(main(['theory-figures', '--out', 'unused']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == ("fastpmd theory-figures: error: needs the scipy package "
                                   "(pip install 'fastpmd[theory]')")
