"""Multi-step tabular simulation: PMD-mean and PMD-part learned from n sampled rollouts per step.

A contextual bandit with ``prompts`` independent contexts, ``arms`` actions each and ``good_arms`` correct
actions (reward 1; the others reward 0, or Bernoulli(mu) with mu ~ U(0, bad_reward) if ``bad_reward > 0``).
The policy is a table of logits. The initial success probability of each prompt is log-uniform in ``p0_range``.

One step, as in LLM post-training with the released PMD-mean recipe:
1. sample ``n`` actions per prompt from the current policy pi_t and draw their rewards;
2. per-sample targets ``a_i = r_i - b`` with ``b`` the group mean (PMD-mean) or ``tau*log mean_j exp(r_j/tau)``
   (PMD-part); the ``-loo`` variants leave sample i out of its own baseline (the released code's choices);
3. ``inner_steps`` full-batch gradient steps (learning rate ``lr``) on the regression loss
   ``mean_i (a_i - tau*Delta_i)^2 / (2*tau)``, ``Delta_i = log pi_theta(y_i) - log pi_t(y_i)``, starting from
   pi_t (stale / off-policy updates: pi_t is frozen while theta moves).
The ``*-exact`` methods apply the population update (:func:`fastpmd.theory.pmd_mean_update`,
:func:`fastpmd.theory.pmd_part_update`) with the true expected rewards instead: what infinitely many rollouts
and a perfect fit would give.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from . import _logsumexp, mean_baseline, partition_baseline, pmd_mean_update, pmd_part_update

__all__ = ["TabularConfig", "METHODS", "init_bandit", "simulate_tabular"]

METHODS = ("pmd-mean", "pmd-part", "pmd-mean-loo", "pmd-part-loo", "pmd-mean-exact", "pmd-part-exact")


@dataclass(frozen=True)
class TabularConfig:
    prompts: int = 128
    arms: int = 64
    good_arms: int = 2
    n: int = 16
    tau: float = 0.05
    steps: int = 60
    inner_steps: int = 16
    lr: float = 1.0
    p0_range: tuple[float, float] = (0.005, 0.3)
    bad_reward: float = 0.0
    seed: int = 0

    def with_(self, **kw) -> "TabularConfig":
        return replace(self, **kw)


def init_bandit(cfg: TabularConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean rewards mu [P, K], good mask [P, K], initial logits [P, K])."""
    p, k, g = cfg.prompts, cfg.arms, cfg.good_arms
    if not 0 < g < k:
        raise ValueError("need 0 < good_arms < arms")
    good = np.zeros((p, k), bool)
    np.put_along_axis(good, np.argsort(rng.random((p, k)), axis=1)[:, :g], True, axis=1)
    bad_mu = rng.uniform(0.0, cfg.bad_reward, (p, k)) if cfg.bad_reward > 0 else np.zeros((p, k))
    mu = np.where(good, 1.0, bad_mu)
    theta = rng.normal(0.0, 1.0, (p, k))
    lo, hi = cfg.p0_range
    p0 = np.exp(rng.uniform(np.log(lo), np.log(hi), p))
    lse_bad = _logsumexp(np.where(good, -np.inf, theta), axis=1)
    lse_good = _logsumexp(np.where(good, theta, -np.inf), axis=1)
    theta = theta + good * (np.log(p0 / (1 - p0)) + lse_bad - lse_good)[:, None]  # good mass = p0
    return mu, good, theta


def _log_softmax(theta: np.ndarray) -> np.ndarray:
    return theta - _logsumexp(theta, axis=1, keepdims=True)


def _fit(theta: np.ndarray, y: np.ndarray, a: np.ndarray, cfg: TabularConfig) -> np.ndarray:
    """inner_steps gradient steps on mean_i (a_i - tau*Delta_i)^2 / (2 tau), per prompt, from theta."""
    p, n = y.shape
    old = np.take_along_axis(_log_softmax(theta), y, 1)
    rows = np.repeat(np.arange(p), n)
    th = theta.copy()
    for _ in range(cfg.inner_steps):
        logp = _log_softmax(th)
        res = a - cfg.tau * (np.take_along_axis(logp, y, 1) - old)  # = -d loss_i / d Delta_i
        grad = np.zeros_like(th)  # ascent direction: sum_i res_i (e_{y_i} - pi_theta)
        np.add.at(grad, (rows, y.ravel()), res.ravel())
        grad -= res.sum(1, keepdims=True) * np.exp(logp)
        th += cfg.lr * grad / n
    return th


def simulate_tabular(method: str, cfg: TabularConfig = TabularConfig()) -> dict[str, np.ndarray]:
    """Run ``cfg.steps`` steps of ``method`` (one of METHODS); same bandit and start for every method.

    Returns arrays of length ``steps + 1`` (the state before each step and after the last):
    ``reward`` (E_pi[mu], mean over prompts), ``reward_se`` (its standard error), ``collapsed`` (fraction of
    prompts where a single wrong arm holds > 90% of the mass), ``entropy`` (mean over prompts), and ``kl``
    (mean KL(pi_{t+1} || pi_t), 0 at the end).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    rng = np.random.default_rng(cfg.seed)
    mu, good, theta = init_bandit(cfg, rng)
    sample_rng = np.random.default_rng([cfg.seed, 1])
    rows = np.arange(cfg.prompts)
    out = {key: np.zeros(cfg.steps + 1) for key in ("reward", "reward_se", "collapsed", "entropy", "kl")}
    for t in range(cfg.steps + 1):
        logp = _log_softmax(theta)
        pi = np.exp(logp)
        j = (pi * mu).sum(1)
        out["reward"][t] = j.mean()
        out["reward_se"][t] = j.std(ddof=1) / np.sqrt(len(j)) if len(j) > 1 else 0.0
        out["collapsed"][t] = np.mean(np.where(good, 0.0, pi).max(1) > 0.9)
        out["entropy"][t] = -(pi * logp).sum(1).mean()
        if t == cfg.steps:
            break
        if method == "pmd-mean-exact":
            new_logp = np.log(np.maximum(pmd_mean_update(pi, mu, cfg.tau).pi, 1e-300))
        elif method == "pmd-part-exact":
            new_logp = np.log(np.maximum(pmd_part_update(pi, mu, cfg.tau).pi, 1e-300))
        else:
            cdf = np.cumsum(pi, axis=1)
            y = np.minimum((cdf[:, None, :] < sample_rng.random((cfg.prompts, cfg.n, 1))).sum(-1), cfg.arms - 1)
            r = (sample_rng.random(y.shape) < mu[rows[:, None], y]).astype(np.float64)
            loo = method.endswith("-loo")
            if method.startswith("pmd-mean"):
                b = mean_baseline(r, loo=loo)
            else:
                b = partition_baseline(r, cfg.tau, loo=loo)
            new_logp = _log_softmax(_fit(theta, y, r - (b if loo else b[:, None]), cfg))
        out["kl"][t] = (np.exp(new_logp) * (new_logp - logp)).sum(1).mean()
        theta = new_logp
    return out
