"""Adaptive tau: a per-prompt PMD temperature from the prompt's mean reward (opt-in, `tau_schedule="mean-reward"`).

Source: the exact large-sample PMD-mean update (Theorem 3.1 of the paper; `fastpmd.theory.pmd_mean_update`).
With A = r - E[r], its minimiser satisfies tau*log u + tau*lam*u = A for every response (u = pi'/pi_t).

Derivation (binary reward, gap g = correct - incorrect, success probability p = mean reward fraction):
A takes two values, (1-p)*g on correct and -p*g on wrong responses, so u takes two values u_c, u_w, and the
update moves only the success probability; within each class pi keeps its shape. Write l = log(u_c/u_w) for the
change of the log-odds of success. Normalisation p*u_c + (1-p)*u_w = 1 gives u_w = 1/(1 + p*(e^l - 1)),
u_c = e^l*u_w, and the two stationarity equations are linear in (tau, mu = tau*lam):
    tau*log u_c + mu*u_c = (1-p)*g,    tau*log u_w + mu*u_w = -p*g
Eliminating mu:   tau = g / (u_w*log u_c - u_c*log u_w)
                      = g*(1 + p*s) / (l + s*log(1 + p*s)),   s = e^l - 1.
So `tau_for_logodds_step(p, l, g)` is the temperature at which the exact update raises prompt p's log-odds by
exactly l. At fixed tau the step is small for hard prompts (PMD-mean is conservative when p is small: tau 0.05
moves p = 0.01 to 0.379 only, log-odds +4.1, while the KL solution moves it by g/tau = 20). The schedule keeps the
step equal across prompts: l* is the step the configured tau takes at p = 1/2 (solved once, by bisection), and
prompt i gets tau_i = tau_for_logodds_step(p_i, l*, g), so tau_i = tau at p = 1/2, smaller for hard prompts
(roughly g*p/l* once p*e^l* >> 1) and larger for easy ones; at p = 0 or 1 (no signal) tau_i = g/l*.

Assumptions, stated honestly: binary rewards (two values, `low`/`high`); the population (infinite-sample) update
solved exactly, not the few finite-sample gradient steps a trainer takes; p estimated by the group's mean reward
(noisy for small n); one tau per prompt. It is a heuristic built on the paper's analysis, not a result of it.
Plain-PyTorch equivalent: tau_i = g*(1 + p_i*s)/(l + s*log(1 + p_i*s)) with p_i the group mean fraction.
"""
from __future__ import annotations

import math

import torch

from ._checks import check_positive, check_tensor
from .advantages import check_group_args, make_groups

TAU_SCHEDULES = ("none", "mean-reward")


def tau_for_logodds_step(p: torch.Tensor | float, step: float, gap: float = 1.0) -> torch.Tensor:
    """tau [..] at which the exact PMD-mean update raises the log-odds of success p [..] (in [0, 1]; checked, one
    host sync) by `step` (see above).

    Overflow-free for any step: with L = log(1 + p*s) = logaddexp(log(1-p), log(p) + step), numerator and
    denominator are divided by 1 + p*s = e^L:  tau = g / (step*e^-L + exp(step - L + log L) - L*e^-L)."""
    step, gap = check_positive("step", step), check_positive("gap", gap)
    if not isinstance(p, torch.Tensor) and not isinstance(p, bool) and isinstance(p, (int, float)):
        p = torch.tensor(float(p), dtype=torch.float64)
    p = check_tensor("p", p)
    p = p.to(torch.float64 if p.dtype == torch.float64 else torch.float32)
    outside = ~((p >= 0) & (p <= 1))  # NaN is outside too
    if bool(outside.any()):
        raise ValueError(f"p must lie in [0, 1] (a success probability), got {float(p[outside].flatten()[0]):g}")
    L = torch.logaddexp(torch.log1p(-p), torch.log(p) + step)  # log(1 + p*s) in [0, step]
    e = torch.exp(-L)
    return gap / (step * e + torch.exp(step - L + torch.log(L)) - L * e)


def reference_logodds_step(tau: float, gap: float = 1.0, p_ref: float = 0.5) -> float:
    """The log-odds step l with tau_for_logodds_step(p_ref, l, gap) = tau (decreasing in l; bisection in log l)."""
    tau, gap = check_positive("tau", tau), check_positive("gap", gap)
    f = lambda ll: float(tau_for_logodds_step(torch.tensor(p_ref, dtype=torch.float64), math.exp(ll), gap)) - tau  # noqa: E731
    lo, hi = math.log(1e-6), math.log(1e6)
    if f(lo) < 0 or f(hi) > 0:
        raise ValueError(f"tau={tau} is outside the range the mean-reward schedule covers")
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
    return math.exp(0.5 * (lo + hi))


def sequence_tau(rewards: torch.Tensor, *, tau: float, schedule: str, low: float, high: float,
                 group_size: int | None = None, group_ids: torch.Tensor | None = None):
    """The loss temperature: `tau` (schedule "none") or a [B] tensor, one value per prompt ("mean-reward")."""
    if schedule not in TAU_SCHEDULES:
        raise ValueError(f"tau_schedule must be one of {TAU_SCHEDULES}, got {schedule!r}")
    tau = check_positive("tau", tau)
    if schedule == "none":
        return tau
    if not high > low:
        raise ValueError(f"tau_schedule='mean-reward' needs binary rewards with high > low, got {low}, {high}")
    check_tensor("rewards", rewards, dims=1)
    check_group_args(rewards.numel(), group_size, group_ids)
    r = rewards.to(torch.float64 if rewards.dtype == torch.float64 else torch.float32)
    g, _, finite = make_groups(r.numel(), r.device, group_size, group_ids, check=torch.isfinite(r).all())
    if not finite:  # one host sync, as in fastpmd.advantages
        raise ValueError("rewards must be finite (found NaN or inf)")
    p = ((g.sum(r) / g.count.to(r.dtype) - low) / (high - low)).clamp(0.0, 1.0)  # [B]
    gap = high - low
    return tau_for_logodds_step(p, reference_logodds_step(tau, gap), gap)
