"""Toy figures of the PMD-mean paper, reproduced with fastpmd.theory (numpy/scipy + matplotlib, CPU, ~1 min).

    python -m fastpmd.theory.figures --out docs/img        # or: fastpmd theory-figures --out DIR

Writes
  theory_log_partition.png   tau*log Z against the mean reward p (binary rewards), several tau
  theory_log_ratios.png      log(pi'/pi) of the correct / wrong answer and the new success probability against p
  theory_estimation_error.png  baseline estimation error against the rollout count n (tau = 0.05, 100 seeds)
  theory_tabular.png         multi-step tabular bandit: both methods learned from n sampled rollouts per step
and prints the key numbers (``--json PATH`` writes all of them; ``--sweep`` prints the tabular robustness table).
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from fastpmd._cli import ArgumentParser
from fastpmd.theory import (
    binary_baseline_errors,
    pmd_mean_update,
    pmd_part_update,
    tau_log_partition,
)
from fastpmd.theory.sim import TabularConfig, simulate_tabular

MEAN_C, PART_C = "tab:blue", "tab:red"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "legend.fontsize": 8, "figure.dpi": 100})
    return plt


def _save(fig, out: str, name: str) -> str:
    path = os.path.join(out, name)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def _binary(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Policies [len(p), 2] = (correct, wrong) and rewards (1, 0)."""
    pi = np.stack([p, 1.0 - p], axis=-1)
    return pi, np.broadcast_to(np.array([1.0, 0.0]), pi.shape)


# ------------------------------------------------------------------------------------------------ figure 1
def fig_log_partition(plt, out: str, taus=(0.01, 0.05, 0.1, 0.2, 0.5, 1.0)) -> dict:
    p = np.concatenate([np.logspace(-4, -1, 120), np.linspace(0.1, 1.0, 181)[1:]])
    pi, r = _binary(p)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    cmap = plt.get_cmap("viridis")
    summary = {}
    for i, tau in enumerate(taus):
        v = tau_log_partition(pi, r, tau)
        summary[str(tau)] = {f"p={q}": float(tau_log_partition([q, 1 - q], [1.0, 0.0], tau)) for q in (0.01, 0.1, 0.5)}
        for ax in axes:
            ax.plot(p, v, color=cmap(i / (len(taus) - 1)), label=rf"$\tau\log Z$, $\tau$={tau:g}")
    for ax in axes:
        ax.plot(p, p, "k--", lw=1.5, label=r"$E[r] = p$ (PMD-mean)")
        ax.set_xlabel("mean reward p = P(correct)")
        ax.set_ylabel("baseline")
        ax.grid(alpha=0.3)
    axes[0].set_title(r"$\tau\log E[e^{r/\tau}]$ (PMD-part) vs $E[r]$ (PMD-mean), $r\in\{0,1\}$")
    axes[1].set_xscale("log")
    axes[1].set_title(r"same, log x: $\tau\log Z \approx 1 + \tau\log p$ for $p \gg e^{-1/\tau}$")
    axes[0].legend(loc="lower right")
    fig.tight_layout()
    return {"path": _save(fig, out, "theory_log_partition.png"), "tau_log_z": summary}


# ------------------------------------------------------------------------------------------------ figure 2
def fig_log_ratios(plt, out: str, taus=(0.01, 0.05, 0.2)) -> dict:
    p = np.logspace(-3, np.log10(0.995), 200)
    pi, r = _binary(p)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    styles = ["-", "--", ":"]
    for tau, ls in zip(taus, styles):
        m, k = pmd_mean_update(pi, r, tau), pmd_part_update(pi, r, tau)
        axes[0].plot(p, m.log_ratio[:, 0], ls, color=MEAN_C, label=rf"PMD-mean $\tau$={tau:g}")
        axes[0].plot(p, k.log_ratio[:, 0], ls, color=PART_C, label=rf"PMD-part $\tau$={tau:g}")
        axes[1].plot(p, -m.log_ratio[:, 1], ls, color=MEAN_C)
        axes[1].plot(p, -k.log_ratio[:, 1], ls, color=PART_C)
        axes[2].plot(p, m.pi[:, 0], ls, color=MEAN_C)
        axes[2].plot(p, k.pi[:, 0], ls, color=PART_C)
    axes[2].plot(p, p, color="gray", lw=1, label="no update")
    refs = {}
    for q in (0.01, 0.05, 0.2):
        new = float(pmd_mean_update([q, 1 - q], [1.0, 0.0], 0.05).pi[0])
        refs[f"p={q}"] = {"pmd_mean": new, "pmd_part": float(pmd_part_update([q, 1 - q], [1.0, 0.0], 0.05).pi[0])}
        axes[2].plot([q], [new], "o", color=MEAN_C, ms=4)
        axes[2].annotate(f"{new:.3f}", (q, new), textcoords="offset points", xytext=(4, -10), fontsize=7)
    titles = [
        r"$\log\,\pi_{t+1}/\pi_t$ of the correct answer",
        r"$-\log\,\pi_{t+1}/\pi_t$ of a wrong answer",
        r"new P(correct) (dots: $\tau$=0.05)",
    ]
    for ax, title in zip(axes, titles):
        ax.set_xscale("log")
        ax.set_xlabel(r"$p$ = P(correct) under $\pi_t$")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(r"$\log\,\pi_{t+1}(y)/\pi_t(y)$")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    axes[2].legend(loc="lower right")
    fig.suptitle("One exact step, binary reward {1, 0}: PMD-mean (blue, Lambert W) vs PMD-part (red, KL)",
                 fontsize=10)
    fig.tight_layout()
    return {"path": _save(fig, out, "theory_log_ratios.png"), "new_p_correct_tau0.05": refs}


# ------------------------------------------------------------------------------------------------ figure 3
def fig_estimation_error(plt, out: str, tau=0.05, seeds=100, ps=(0.01, 0.02, 0.05, 0.1, 0.2), ns=None) -> dict:
    ns = ns or [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    rng = np.random.default_rng(0)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    cmap = plt.get_cmap("plasma")
    table = {}
    for i, q in enumerate(ps):
        em, ep = np.zeros(len(ns)), np.zeros(len(ns))
        sm, sp = np.zeros(len(ns)), np.zeros(len(ns))
        for j, n in enumerate(ns):
            e = binary_baseline_errors(q, n, tau, seeds=seeds, rng=rng)
            em[j], ep[j] = e["mean"].mean(), e["part"].mean()
            sm[j], sp[j] = e["mean"].std(ddof=1) / np.sqrt(seeds), e["part"].std(ddof=1) / np.sqrt(seeds)
        table[f"p={q}"] = {f"n={n}": {"mean": float(a), "part": float(b)} for n, a, b in zip(ns, em, ep)}
        c = cmap(i / len(ps))
        for ax, v, s in ((axes[0], em, sm), (axes[1], ep, sp)):
            ax.plot(ns, v, "o-", ms=3, color=c, label=f"p={q:g}")
            ax.fill_between(ns, np.maximum(v - s, 1e-6), v + s, color=c, alpha=0.2)
    axes[0].set_title(r"PMD-mean baseline: $|\bar r - E[r]|$")
    axes[1].set_title(rf"PMD-part baseline: $|\tau\log\overline{{e^{{r/\tau}}}} - \tau\log Z|$, $\tau$={tau:g}")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("rollouts per prompt n")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel(f"mean abs. error ({seeds} seeds)")
    axes[1].legend()
    fig.tight_layout()
    return {"path": _save(fig, out, "theory_estimation_error.png"), "mean_abs_error": table}


# ------------------------------------------------------------------------------------------------ figure 4
def fig_tabular(
    plt, out: str, base: TabularConfig, ns=(4, 8, 16, 32, 64), taus=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
) -> dict:
    methods = {
        "pmd-mean": (MEAN_C, "-", "PMD-mean"),
        "pmd-part": (PART_C, "-", "PMD-part"),
        "pmd-mean-loo": (MEAN_C, "--", "PMD-mean (LOO)"),
        "pmd-part-loo": (PART_C, "--", "PMD-part (LOO)"),
    }
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    steps = np.arange(base.steps + 1)
    curves = {}
    for m, (c, ls, label) in methods.items():
        o = simulate_tabular(m, base)
        curves[m] = o
        axes[0].plot(steps, o["reward"], ls, color=c, label=label)
        axes[0].fill_between(steps, o["reward"] - o["reward_se"], o["reward"] + o["reward_se"], color=c, alpha=0.15)
        axes[1].plot(steps, o["collapsed"], ls, color=c, label=label)
    for m, ls in (("pmd-mean-exact", "-."), ("pmd-part-exact", ":")):
        o = simulate_tabular(m, base)
        curves[m] = o
        axes[0].plot(steps, o["reward"], ls, color="k", lw=1, label=f"{m} (population)")
    axes[0].set_title(rf"$E_\pi[r]$, n={base.n}, $\tau$={base.tau:g}")
    axes[0].set_ylabel(f"mean over {base.prompts} prompts")
    axes[1].set_title("prompts collapsed on a wrong arm (>90%)")
    for ax in axes[:2]:
        ax.set_xlabel("step (one batch of n rollouts per prompt)")
    axes[0].legend(fontsize=7, loc="lower right")

    final = {"n": {}, "tau": {}}
    for m, (c, ls, label) in methods.items():
        vn = [simulate_tabular(m, base.with_(n=n))["reward"][-1] for n in ns]
        vt = [simulate_tabular(m, base.with_(tau=t))["reward"][-1] for t in taus]
        final["n"][m] = dict(zip(map(str, ns), map(float, vn)))
        final["tau"][m] = dict(zip(map(str, taus), map(float, vt)))
        axes[2].plot(ns, vn, "o" + ls, ms=3, color=c, label=label)
        axes[3].plot(taus, vt, "o" + ls, ms=3, color=c, label=label)
    axes[2].set_xscale("log", base=2)
    axes[2].set_xlabel("rollouts per prompt n")
    axes[2].set_title(rf"$E_\pi[r]$ after {base.steps} steps, $\tau$={base.tau:g}")
    axes[3].set_xscale("log")
    axes[3].set_xlabel(r"$\tau$")
    axes[3].set_title(rf"$E_\pi[r]$ after {base.steps} steps, n={base.n}")
    for ax in axes:
        ax.grid(alpha=0.3)
    for ax in (axes[0], axes[2], axes[3]):
        ax.set_ylim(0, 1.02)
    fig.suptitle(
        f"Tabular bandit: {base.prompts} prompts x {base.arms} arms ({base.good_arms} correct), "
        f"{base.inner_steps} stale gradient steps (lr {base.lr:g}) per batch on the log-ratio regression",
        fontsize=10,
    )
    fig.tight_layout()
    summary = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in base.__dict__.items()},
        "final_reward": {m: float(o["reward"][-1]) for m, o in curves.items()},
        "final_collapsed": {m: float(o["collapsed"][-1]) for m, o in curves.items()},
        "final_reward_vs": final,
    }
    return {"path": _save(fig, out, "theory_tabular.png"), **summary}


# ----------------------------------------------------------------------------------------- sweep (table)
SWEEP = (
    ("default (seeds 0-2)", [{"seed": s} for s in range(3)]),
    ("inner_steps=1 (on-policy)", [{"inner_steps": 1}]),
    ("inner_steps=4", [{"inner_steps": 4}]),
    ("inner_steps=64", [{"inner_steps": 64}]),
    ("lr=0.25", [{"lr": 0.25}]),
    ("arms=256", [{"arms": 256}]),
    ("steps=150", [{"steps": 150}]),
    ("wrong arms pay Bernoulli(U(0,0.3))", [{"bad_reward": 0.3}]),
)
SWEEP_METHODS = ("pmd-mean", "pmd-part", "pmd-mean-loo", "pmd-part-loo")


def tabular_sweep(base: TabularConfig) -> list[dict]:
    """Final E[r] and collapsed fraction of the four sampled methods under variations of the default config."""
    rows = []
    for name, variants in SWEEP:
        row = {"setting": name}
        for m in SWEEP_METHODS:
            outs = [simulate_tabular(m, base.with_(**v)) for v in variants]
            row[m] = (
                float(np.mean([o["reward"][-1] for o in outs])),
                float(np.mean([o["collapsed"][-1] for o in outs])),
            )
        rows.append(row)
        print(f"| {name} | " + " | ".join(f"{row[m][0]:.3f} / {row[m][1]:.2f}" for m in SWEEP_METHODS) + " |",
              flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = ArgumentParser(prog="fastpmd theory-figures", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/img", help="directory for the PNGs (created)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, seconds)")
    ap.add_argument("--seeds", type=int, default=100, help="seeds for the estimation-error figure")
    ap.add_argument("--json", default=None, help="also write the numbers behind the figures to this JSON file")
    ap.add_argument("--sweep", action="store_true",
                    help="only print the tabular robustness table (final E[r] / collapsed fraction; ~1 min)")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        print(f"fastpmd theory-figures: error: --seeds must be >= 1, got {args.seeds}", file=sys.stderr)
        return 2
    if args.sweep:
        print("| setting | " + " | ".join(SWEEP_METHODS) + " |\n|---|" + "---|" * len(SWEEP_METHODS))
        tabular_sweep(TabularConfig())
        return 0
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as exc:
        print(f"fastpmd theory-figures: error: --out {args.out}: cannot create ({exc.strerror or exc})", file=sys.stderr)
        return 2
    plt = _plt()
    t0 = time.time()
    base = TabularConfig()
    sim_kw = {}
    seeds = args.seeds
    if args.quick:
        base = base.with_(prompts=16, arms=16, steps=5, inner_steps=4)
        sim_kw = {"ns": (4, 16), "taus": (0.05, 0.2)}
        seeds = min(seeds, 10)
    results = {
        "log_partition": fig_log_partition(plt, args.out),
        "log_ratios": fig_log_ratios(plt, args.out),
        "estimation_error": fig_estimation_error(plt, args.out, seeds=seeds,
                                                 ns=[2, 8, 32] if args.quick else None),
        "tabular": fig_tabular(plt, args.out, base, **sim_kw),
    }
    plt.close("all")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    for key, res in results.items():
        print(f"{key:18s} -> {res['path']}")
    refs = results["log_ratios"]["new_p_correct_tau0.05"]
    print("PMD-mean, tau=0.05, binary reward: " + ", ".join(f"{k} -> {v['pmd_mean']:.3f}" for k, v in refs.items()))
    tab = results["tabular"]
    print("tabular, final E[r]: " + ", ".join(f"{k} {v:.3f}" for k, v in tab["final_reward"].items()))
    print("tabular, collapsed:  " + ", ".join(f"{k} {v:.3f}" for k, v in tab["final_collapsed"].items()))
    print(f"done in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
