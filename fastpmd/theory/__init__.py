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

Why the stationary point is the minimiser: in ``v = log u`` the objective is convex and the feasible set
``E_pi[e^v] <= 1`` is convex; the unconstrained minimiser ``v = A/tau`` violates it (Jensen), so the minimum
sits on ``E_pi[e^v] = 1`` with a non-negative multiplier, which is ``tau*lam``.

Numerics: with ``x = log(lam) + A/tau``, ``W(e^x)`` is the Wright omega function ``omega(x)`` and
``log u = A/tau - omega(x)``. ``log(lam)`` solves the log-space normalisation ``log E_pi[u] = 0`` (bracketed, then
safeguarded Newton, vectorised over a batch), so the update is stable for small ``tau`` (0.01 and far below) and
any bounded rewards; probabilities down to the smallest doubles are fine.

Finite-sample side (the paper's estimation-error analysis): from n rollouts, PMD-mean estimates its baseline
``E_pi[r]`` by the sample mean, PMD-part estimates ``tau*log Z`` by ``tau*log mean_j exp(r_j/tau)``;
:func:`mean_baseline`, :func:`partition_baseline` and :func:`binary_baseline_errors` compute these.

Inputs may be numpy arrays, sequences or torch tensors (converted to float64 numpy); outputs are numpy.
The policy and the rewards broadcast together over leading (batch) dimensions, actions on the last axis.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import wrightomega

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
    try:
        a = np.array(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be an array of numbers ({e})") from None
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite")
    return a


def _check_tau(tau) -> float:
    """A positive finite real number (a Python/numpy scalar or a 0-d array); anything else names tau."""
    if isinstance(tau, (bool, str, bytes)) or tau is None or np.ndim(tau) != 0:
        raise ValueError(f"tau must be a positive finite number, got {tau!r}")
    try:
        tau = float(tau)
    except (TypeError, ValueError):
        raise ValueError(f"tau must be a positive finite number, got {tau!r}") from None
    if not (tau > 0.0 and np.isfinite(tau)):
        raise ValueError(f"tau must be a positive finite number, got {tau}")
    return tau


def _nonempty(a: np.ndarray, name: str, axis: int = -1) -> np.ndarray:
    if a.ndim == 0 or a.shape[axis] == 0:
        raise ValueError(f"{name} must have at least one entry along axis {axis}, got shape {a.shape}")
    return a


def _prepare(pi, rewards) -> tuple[np.ndarray, np.ndarray]:
    pi = _as_array(pi, "pi")
    r = _as_array(rewards, "rewards")
    if pi.ndim == 0 or r.ndim == 0:
        raise ValueError("pi and rewards need an action axis (the last one)")
    _nonempty(pi, "pi")
    _nonempty(r, "rewards")
    pi, r = np.broadcast_arrays(pi, r)
    if np.any(pi < 0):
        raise ValueError("pi must be non-negative")
    total = pi.sum(-1, keepdims=True)
    if np.any(total <= 0):
        raise ValueError("pi must have positive mass")
    if np.any(np.abs(total - 1.0) > 1e-6):
        raise ValueError("pi must sum to 1 over the last axis")
    return pi / total, r.copy()


def _logsumexp(a: np.ndarray, axis: int = -1, keepdims: bool = False) -> np.ndarray:
    """Plain-numpy logsumexp (scipy's is several times slower on small rows); all -inf gives -inf."""
    a = np.asarray(a, dtype=np.float64)
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(a - m), axis=axis, keepdims=True)) + m
    return out if keepdims else np.squeeze(out, axis=axis)


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
    return _scalar_or_array(tau * _logsumexp(_log(pi) + r / tau, axis=-1))


def pmd_part_update(pi, rewards, tau) -> PMDPartUpdate:
    """The KL-regularised PMD step ``argmax E_pi'[r] - tau*KL(pi'||pi) = pi*exp(r/tau)/Z``."""
    tau = _check_tau(tau)
    pi, r = _prepare(pi, rewards)
    logpi = _log(pi)
    log_z = _logsumexp(logpi + r / tau, axis=-1, keepdims=True)
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
_MAX_ITERS = 200  # Newton with bisection fallback; bracket width <= ~1400, so bisection alone needs ~100


def _g(logpi: np.ndarray, x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """log E_pi[u] at log(lam) = s, rows [R, K]; strictly decreasing in s."""
    with np.errstate(over="ignore", invalid="ignore"):
        return _logsumexp(logpi + x - np.real(wrightomega(s[:, None] + x)), axis=-1)


def _solve_log_lam(logpi: np.ndarray, x: np.ndarray) -> np.ndarray:
    """log(lam) per row with E_pi[exp(x - omega(log(lam) + x))] = 1; x = A/tau, logpi -inf off the support.

    g(s) = log E_pi[u] decreases strictly in s; g(-inf) = log E_pi[e^x] > 0 (Jensen, x centred and
    non-constant), and at s = log(max x) the best action has u = 1 exactly and all others u < 1, so g < 0.
    Bracket in log space, then safeguarded Newton (vectorised over rows). Rows where rounding leaves no resolvable
    Jensen gap get -inf (lam -> 0: the KL limit, exact to the precision of the data).
    """
    rows = x.shape[0]
    xmax = np.where(np.isfinite(logpi), x, -np.inf).max(-1)
    out = np.full(rows, -np.inf)
    ok = xmax > 0  # max x <= 0 only through rounding of the centring; then lam is below resolution
    if not ok.any():
        return out
    lp, xx = logpi[ok], x[ok]
    hi = np.log(xmax[ok])
    for _ in range(8):  # absorbs rounding in the centring (g(hi) < 0 in exact arithmetic)
        bad = _g(lp, xx, hi) > 0
        if not bad.any():
            break
        hi = np.where(bad, hi + 1.0, hi)
    lo = hi - 1.0
    gap = np.ones_like(hi)
    floor = np.zeros(hi.shape, bool)
    for _ in range(16):
        need = (_g(lp, xx, lo) <= 0) & ~floor
        if not need.any():
            break
        gap = np.where(need, 2.0 * gap, gap)
        lo = np.where(need, np.maximum(hi - gap, _S_FLOOR), lo)
        floor |= need & (lo <= _S_FLOOR)
    kl_limit = _g(lp, xx, lo) <= 0  # even lam = e^-700 over-shrinks: no resolvable gap
    # Safeguarded Newton: g'(s) = -E_w[omega/(1+omega)], w the normalised terms of g; bisect when a Newton
    # step leaves the bracket. Each iteration keeps g(lo) > 0 >= g(hi).
    s = hi.copy()
    active = np.ones(s.shape, bool)
    for _ in range(_MAX_ITERS):
        with np.errstate(over="ignore", invalid="ignore"):
            om = np.real(wrightomega(s[:, None] + xx))
            terms = lp + xx - om
            gs = _logsumexp(terms, axis=-1)
            w = np.exp(terms - gs[:, None])
            dg = -(w * om / (1.0 + om)).sum(-1)
        root = np.abs(gs) <= 4 * np.finfo(float).eps  # g at rounding level: log(lam) is as good as it gets
        pos = gs > 0
        lo = np.where(pos, s, lo)
        hi = np.where(pos, hi, s)
        with np.errstate(divide="ignore", invalid="ignore"):
            newton = s - gs / dg
        inside = np.isfinite(newton) & (newton > lo) & (newton < hi)
        s_new = np.where(inside, newton, 0.5 * (lo + hi))
        tol = 1e-14 * (1.0 + np.abs(s))
        small = (np.abs(s_new - s) <= tol) | (hi - lo <= tol)
        s = np.where(active & ~root, s_new, s)  # converged rows stay where they are
        active &= ~(root | small)
        if not active.any():
            break
    s[kl_limit] = -np.inf
    out[ok] = s
    return out


def pmd_mean_update(pi, rewards, tau) -> PMDMeanUpdate:
    """Exact minimiser over the simplex of ``E_pi[(A - tau*log(pi'/pi))^2]``, ``A = r - E_pi[r]``.

    ``pi'(y) = pi(y) W(lam e^{A(y)/tau}) / lam``; see the module docstring. Leading dimensions are a batch
    (solved together). Stable for tau down to (well below) 0.01 with rewards in [-1, 1].
    """
    tau = _check_tau(tau)
    pi, r = _prepare(pi, rewards)
    batch, k = pi.shape[:-1], pi.shape[-1]
    p, rew = pi.reshape(-1, k), r.reshape(-1, k)
    sup = p > 0
    logpi = _log(p)
    a = rew - (p * rew).sum(-1, keepdims=True)
    a -= (p * a).sum(-1, keepdims=True)  # second centring pass: E_pi[A] = 0 to rounding
    x = a / tau
    r_sup_max = np.where(sup, rew, -np.inf).max(-1)
    r_sup_min = np.where(sup, rew, np.inf).min(-1)
    moves = r_sup_max > r_sup_min  # constant reward on the support: pi' = pi minimises the objective
    s = np.full(p.shape[0], -np.inf)
    if moves.any():
        s[moves] = _solve_log_lam(logpi[moves], x[moves])
    with np.errstate(over="ignore", invalid="ignore"):
        omega = np.where(np.isfinite(s)[:, None], np.real(wrightomega(s[:, None] + x)), 0.0)
    log_ratio = x - omega
    log_ratio -= _logsumexp(np.where(sup, logpi + log_ratio, -np.inf), axis=-1, keepdims=True)  # exact norm.
    log_ratio[~moves] = np.where(sup[~moves], 0.0, x[~moves])
    new = np.where(sup, np.exp(np.where(sup, logpi, 0.0) + log_ratio), 0.0)
    new /= new.sum(-1, keepdims=True)
    new[~moves] = p[~moves]
    lam = np.exp(s).reshape(batch)
    return PMDMeanUpdate(
        pi=new.reshape(pi.shape),
        log_ratio=log_ratio.reshape(pi.shape),
        lam=_scalar_or_array(lam),
        chi2_coef=_scalar_or_array(tau * lam / 2.0),
        advantage=a.reshape(pi.shape),
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
    r = _nonempty(_as_array(rewards, "rewards"), "rewards", axis)
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
    r = np.moveaxis(_nonempty(_as_array(rewards, "rewards"), "rewards", axis), axis, -1)
    n = r.shape[-1]
    z = r / tau
    if not loo:
        return tau * (_logsumexp(z, axis=-1) - np.log(n))
    if n < 2:
        raise ValueError("leave-one-out needs n >= 2")
    # logsumexp over j != i: mask the diagonal of an [.., n, n] stack (n is a group size, small).
    stack = np.broadcast_to(z[..., None, :], z.shape + (n,)).copy()
    idx = np.arange(n)
    stack[..., idx, idx] = -np.inf
    out = tau * (_logsumexp(stack, axis=-1) - np.log(n - 1))
    return np.moveaxis(out, -1, axis)


def binary_baseline_errors(p, n: int, tau, *, seeds: int = 100, rng=None) -> dict[str, np.ndarray]:
    """Absolute errors of both baselines for binary {0, 1} rewards with success probability ``p``.

    Draws ``seeds`` groups of ``n`` rollouts; returns ``{"mean": |mean_hat - p|, "part": |tau*logZ_hat -
    tau*logZ|}``, each of shape ``[seeds]`` (``[len(p), seeds]`` for an array of ``p``). The same draws are used
    for both estimators.
    """
    tau = _check_tau(tau)
    for name, v in (("n", n), ("seeds", seeds)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    p_arr = np.atleast_1d(_as_array(p, "p"))
    if np.any((p_arr < 0) | (p_arr > 1)):
        raise ValueError(f"p must be a success probability in [0, 1], got {p!r}")
    rng = np.random.default_rng(rng)
    r = (rng.random((p_arr.size, seeds, int(n))) < p_arr[:, None, None]).astype(np.float64)
    true_part = np.array([tau_log_partition([q, 1 - q], [1.0, 0.0], tau) for q in p_arr])
    err_mean = np.abs(mean_baseline(r) - p_arr[:, None])
    err_part = np.abs(partition_baseline(r, tau) - true_part[:, None])
    if np.ndim(p) == 0:
        err_mean, err_part = err_mean[0], err_part[0]
    return {"mean": err_mean, "part": err_part}
