"""Population theory of PMD-mean and PMD-part on a finite action set (numpy / scipy only).

One policy-mirror-descent step from ``pi`` (a distribution over K actions) with rewards ``r`` and temperature
``tau``, solved exactly:

* PMD-part (the KL / partition solution): ``pi'(y) = pi(y) exp(r(y)/tau) / Z``, ``Z = E_pi[exp(r/tau)]``.
  It is also the minimiser of ``E_pi[(r - tau*log Z - tau*log(pi'/pi))^2]``.
* PMD-mean: the minimiser over the simplex of ``E_pi[(A - tau*log(pi'/pi))^2]`` with ``A = r - E_pi[r]``:

      pi'(y) = pi(y) * W(lam * exp(A(y)/tau)) / lam,

  W the principal Lambert W and ``lam > 0`` fixed by normalisation. Stationarity reads
  ``tau*log u + tau*lam*u = A`` (``u = pi'/pi``), the first-order condition of the mixed KL-chi^2 subproblem

      max_pi'  E_pi'[r] - tau * KL(pi' || pi) - chi2_coef * chi^2(pi' || pi),   chi2_coef = tau * lam / 2,

  with ``chi^2(pi' || pi) = E_pi[u^2] - 1``. (The paper's constant in front of chi^2 may be written differently;
  this module's convention is the one above, and the tests check it.) Also ``lam = KL(pi || pi')``.

Numerics: with ``x = log(lam) + A/tau``, ``W(e^x)`` is the Wright omega function ``omega(x)`` and
``log u = A/tau - omega(x)``; ``log(lam)`` is found by Brent's method on a log-space normalisation equation, so
the update is stable for small ``tau`` (0.01 and below) and rewards of any bounded range.

Finite-sample side (the paper's estimation-error analysis): from n rollouts, PMD-mean estimates its baseline
``E_pi[r]`` by the sample mean, PMD-part estimates ``tau*log Z`` by ``tau*log mean_j exp(r_j/tau)``;
:func:`mean_baseline`, :func:`partition_baseline` and :func:`binary_baseline_errors` compute these.

Inputs may be numpy arrays, sequences or torch tensors (converted to float64 numpy); outputs are numpy.
The policy and the rewards broadcast together over leading (batch) dimensions, actions on the last axis.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq
from scipy.special import logsumexp, wrightomega

__all__ = [
    "PMDMeanUpdate",
    "PMDPartUpdate",
    "pmd_mean_update",
    "pmd_part_update",
    "tau_log_partition",
    "pmd_mean_objective",
    "mixed_kl_chi2_objective",
    "mean_baseline",
    "partition_baseline",
    "binary_baseline_errors",
]


# --------------------------------------------------------------------------------------------------- helpers
def _as_array(x, name: str) -> np.ndarray:
    """float64 numpy copy of an array-like or a torch tensor (without importing torch)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().double().numpy()
    a = np.array(x, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite")
    return a


def _check_tau(tau) -> float:
    tau = float(tau)
    if not (tau > 0.0 and np.isfinite(tau)):
        raise ValueError(f"tau must be a positive finite number, got {tau}")
    return tau


def _prepare(pi, rewards) -> tuple[np.ndarray, np.ndarray]:
    pi = _as_array(pi, "pi")
    r = _as_array(rewards, "rewards")
    if pi.ndim == 0 or r.ndim == 0:
        raise ValueError("pi and rewards need an action axis (the last one)")
    pi, r = np.broadcast_arrays(pi, r)
    if np.any(pi < 0):
        raise ValueError("pi must be non-negative")
    total = pi.sum(-1, keepdims=True)
    if np.any(total <= 0):
        raise ValueError("pi must have positive mass")
    if np.any(np.abs(total - 1.0) > 1e-6):
        raise ValueError("pi must sum to 1 over the last axis")
    return pi / total, r.copy()


def _log(pi: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(pi)


def _scalar_or_array(x: np.ndarray):
    return float(x) if np.ndim(x) == 0 else x


# ---------------------------------------------------------------------------------------------- PMD-part
@dataclass(frozen=True)
class PMDPartUpdate:
    """Exact KL (partition) step ``pi * exp(r/tau) / Z``.

    pi: the new policy. log_ratio: ``log(pi_new/pi) = r/tau - log Z`` (defined for every action; actions with
    ``pi == 0`` keep probability 0). log_z: ``log Z = log E_pi[exp(r/tau)]``. baseline: ``tau * log Z``, the
    value PMD-part subtracts from the reward. tau: the temperature.
    """

    pi: np.ndarray
    log_ratio: np.ndarray
    log_z: float | np.ndarray
    baseline: float | np.ndarray
    tau: float


def tau_log_partition(pi, rewards, tau) -> float | np.ndarray:
    """``tau * log E_pi[exp(r/tau)]`` (the soft value; tends to max r on the support as tau -> 0)."""
    tau = _check_tau(tau)
    pi, r = _prepare(pi, rewards)
    return _scalar_or_array(tau * logsumexp(_log(pi) + r / tau, axis=-1))


def pmd_part_update(pi, rewards, tau) -> PMDPartUpdate:
    """The KL-regularised PMD step ``argmax E_pi'[r] - tau*KL(pi'||pi) = pi*exp(r/tau)/Z``."""
    tau = _check_tau(tau)
    pi, r = _prepare(pi, rewards)
    logpi = _log(pi)
    log_z = logsumexp(logpi + r / tau, axis=-1, keepdims=True)
    log_ratio = r / tau - log_z
    new = np.exp(logpi + log_ratio)
    new /= new.sum(-1, keepdims=True)
    log_z = log_z[..., 0]
    return PMDPartUpdate(new, log_ratio, _scalar_or_array(log_z), _scalar_or_array(tau * log_z), tau)


# ---------------------------------------------------------------------------------------------- PMD-mean
@dataclass(frozen=True)
class PMDMeanUpdate:
    """Exact population PMD-mean step.

    pi: the new policy. log_ratio: ``log(pi_new/pi) = A/tau - omega(log(lam) + A/tau)`` (defined for every
    action; actions with ``pi == 0`` keep probability 0). lam: the normalising Lambert-W parameter (0 when the
    rewards are constant on the support: no update). chi2_coef: ``tau*lam/2``, the weight of chi^2(pi_new||pi) in
    the equivalent subproblem ``max E[r] - tau*KL - chi2_coef*chi^2``. advantage: ``A = r - E_pi[r]``.
    tau: the temperature.
    """

    pi: np.ndarray
    log_ratio: np.ndarray
    lam: float | np.ndarray
    chi2_coef: float | np.ndarray
    advantage: np.ndarray
    tau: float


_S_FLOOR = -700.0  # log(lam) below this is treated as lam -> 0 (the update then equals the KL step to ~1e-300)


def _solve_log_lam(logpi: np.ndarray, a: np.ndarray) -> float:
    """log(lam) with sum_y pi(y) exp(a(y) - omega(s + a(y))) = 1 for one row; a = A/tau, support only.

    g(s) = logsumexp(log pi + a - omega(s + a)) is strictly decreasing in s. g(-inf) = log E_pi[e^a] > 0
    (Jensen, a centred and non-constant), and at s = log(max a) the best action has u = 1 exactly and every
    other u < 1, so g < 0 there.
    """

    def g(s: float) -> float:
        return float(logsumexp(logpi + a - np.real(wrightomega(s + a))))

    hi = float(np.log(a.max()))
    while g(hi) > 0:  # not expected (see above); guards rounding in the centring
        hi += 1.0
    lo = hi - 1.0
    step = 1.0
    while g(lo) <= 0:
        step *= 2.0
        lo = hi - step
        if lo < _S_FLOOR:
            return -np.inf if g(_S_FLOOR) <= 0 else brentq(g, _S_FLOOR, hi, xtol=1e-13, rtol=1e-15)
    return brentq(g, lo, hi, xtol=1e-13, rtol=1e-15)


def pmd_mean_update(pi, rewards, tau) -> PMDMeanUpdate:
    """Exact minimiser over the simplex of ``E_pi[(A - tau*log(pi'/pi))^2]``, ``A = r - E_pi[r]``.

    ``pi'(y) = pi(y) W(lam e^{A(y)/tau}) / lam``; see the module docstring. Leading dimensions are a batch
    (solved row by row). Stable for tau down to (well below) 0.01 with rewards in [-1, 1].
    """
    tau = _check_tau(tau)
    pi, r = _prepare(pi, rewards)
    batch = pi.shape[:-1]
    k = pi.shape[-1]
    pi2, r2 = pi.reshape(-1, k), r.reshape(-1, k)
    log_ratio = np.zeros_like(pi2)
    adv = np.zeros_like(pi2)
    log_lam = np.full(pi2.shape[0], -np.inf)
    for i in range(pi2.shape[0]):
        p, rew = pi2[i], r2[i]
        sup = p > 0
        a = rew - p @ rew
        a -= p @ a  # second centring pass: E_pi[A] = 0 to rounding
        adv[i] = a
        rs = rew[sup]
        if rs.max() == rs.min():  # constant reward on the support: the objective is minimised by pi' = pi
            log_ratio[i] = np.where(sup, 0.0, a / tau)
            continue
        x = a / tau
        s = _solve_log_lam(np.log(p[sup]), x[sup])
        log_lam[i] = s
        lr = x - np.real(wrightomega(s + x)) if np.isfinite(s) else x.copy()
        lr -= logsumexp(np.log(p[sup]) + lr[sup])  # exact normalisation (removes the root-finder's residual)
        log_ratio[i] = lr
    new = np.where(pi2 > 0, np.exp(_log(pi2) + log_ratio), 0.0)
    new /= new.sum(-1, keepdims=True)
    lam = np.exp(log_lam).reshape(batch)
    return PMDMeanUpdate(
        pi=new.reshape(pi.shape),
        log_ratio=log_ratio.reshape(pi.shape),
        lam=_scalar_or_array(lam),
        chi2_coef=_scalar_or_array(tau * lam / 2.0),
        advantage=adv.reshape(pi.shape),
        tau=tau,
    )


# -------------------------------------------------------------------------------------------- objectives
def pmd_mean_objective(pi, rewards, tau, pi_new) -> float | np.ndarray:
    """``E_pi[(A - tau*log(pi_new/pi))^2]`` with ``A = r - E_pi[r]`` (the PMD-mean regression loss)."""
    tau = _check_tau(tau)
    pi, r = _prepare(pi, rewards)
    new = _as_array(pi_new, "pi_new")
    a = r - (pi * r).sum(-1, keepdims=True)
    sup = pi > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        lr = np.where(sup, _log(new) - _log(np.where(sup, pi, 1.0)), 0.0)
        val = np.where(sup, pi * (a - tau * lr) ** 2, 0.0).sum(-1)
    return _scalar_or_array(val)


def mixed_kl_chi2_objective(pi, rewards, tau, chi2_coef, pi_new) -> float | np.ndarray:
    """``E_pi_new[r] - tau*KL(pi_new||pi) - chi2_coef*chi^2(pi_new||pi)`` (to be maximised over pi_new)."""
    tau = _check_tau(tau)
    pi, r = _prepare(pi, rewards)
    new = _as_array(pi_new, "pi_new")
    sup = pi > 0
    if np.any(new[~sup] > 0):
        return -np.inf
    safe = np.where(sup, pi, 1.0)
    u = np.where(sup, new / safe, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(new > 0, new * (_log(new) - _log(safe)), 0.0).sum(-1)
    chi2 = (pi * u**2).sum(-1) - 1.0
    val = (new * r).sum(-1) - tau * kl - np.asarray(chi2_coef) * chi2
    return _scalar_or_array(val)


# ------------------------------------------------------------------------------ finite-sample estimators
def mean_baseline(rewards, *, loo: bool = False, axis: int = -1) -> np.ndarray:
    """PMD-mean's baseline from n rollouts: the sample mean (``loo``: the mean of the other n-1)."""
    r = _as_array(rewards, "rewards")
    n = r.shape[axis]
    total = r.sum(axis=axis, keepdims=True)
    if loo:
        if n < 2:
            raise ValueError("leave-one-out needs n >= 2")
        return (total - r) / (n - 1)
    return np.squeeze(total / n, axis=axis)


def partition_baseline(rewards, tau, *, loo: bool = False, axis: int = -1) -> np.ndarray:
    """PMD-part's baseline from n rollouts: ``tau*log((1/n) sum_j exp(r_j/tau))`` via logsumexp.

    ``loo``: ``tau*log((1/(n-1)) sum_{j != i} exp(r_j/tau))`` for each i (no clamping, no underflow).
    """
    tau = _check_tau(tau)
    r = np.moveaxis(_as_array(rewards, "rewards"), axis, -1)
    n = r.shape[-1]
    z = r / tau
    if not loo:
        return tau * (logsumexp(z, axis=-1) - np.log(n))
    if n < 2:
        raise ValueError("leave-one-out needs n >= 2")
    # logsumexp over j != i: mask the diagonal of an [.., n, n] stack (n is a group size, small).
    stack = np.broadcast_to(z[..., None, :], z.shape + (n,)).copy()
    idx = np.arange(n)
    stack[..., idx, idx] = -np.inf
    out = tau * (logsumexp(stack, axis=-1) - np.log(n - 1))
    return np.moveaxis(out, -1, axis)


def binary_baseline_errors(p, n: int, tau, *, seeds: int = 100, rng=None) -> dict[str, np.ndarray]:
    """Absolute errors of both baselines for binary {0, 1} rewards with success probability ``p``.

    Draws ``seeds`` groups of ``n`` rollouts; returns ``{"mean": |mean_hat - p|, "part": |tau*logZ_hat -
    tau*logZ|}``, each of shape ``[seeds]`` (``[len(p), seeds]`` for an array of ``p``). The same draws are used
    for both estimators.
    """
    tau = _check_tau(tau)
    rng = np.random.default_rng(rng)
    p_arr = np.atleast_1d(np.asarray(p, dtype=np.float64))
    r = (rng.random((p_arr.size, seeds, int(n))) < p_arr[:, None, None]).astype(np.float64)
    true_part = np.array([tau_log_partition([q, 1 - q], [1.0, 0.0], tau) for q in p_arr])
    err_mean = np.abs(mean_baseline(r) - p_arr[:, None])
    err_part = np.abs(partition_baseline(r, tau) - true_part[:, None])
    if np.ndim(p) == 0:
        err_mean, err_part = err_mean[0], err_part[0]
    return {"mean": err_mean, "part": err_part}
