"""The study's async cells: rollout staleness from overlapping generation and training (docs/study.md,
"Asynchronous staleness"), next to the synchronous grid's mini-batch staleness.

An async cell is one `fastpmd train` run under torchrun with 1 inference + ASYNC_TRAINERS trainer processes
(`rollout.mode=async`, `rollout.max_staleness=k`), from its seed's warm-up model, with the grid's P, n, tau and
variant, one mini-batch per step (so one push per optimizer step and k counts optimizer updates) and
`loss.rollout_correction` (TIS by default, the setting docs/training.md recommends with async). Async runs have
no held-out eval, so held-out avg@eval_n is measured after the run by an eval-only colocated process
(`--max-steps 0 --warmup-steps 0 --model RUN/hf`): its eval seed does not depend on the step, so this is the eval
an in-run final eval would have made. The start value is the same eval of the warm-up model, once per seed.

Outputs in OUT: cells/<variant>_async<k>[_notis]_n<n>_s<seed>/ (metrics.jsonl, hf/, heldout/), study_async_table.md,
study_async_rewards.png (batch reward, Figure 4 style; k = 0 runs the same path without staleness) and
study_async_logratio.png (mean |log pi_t - log pi_behaviour| per response token, the staleness the loss sees:
with one mini-batch per step and pi_old recomputed by the trainer, Delta itself is 0 at every step).
"""
from __future__ import annotations

import json
import statistics
import threading
from pathlib import Path

from .study import COLLAPSE_DROP, VARIANTS, _ms, _run, band, cell_flags, panel_figure, reward_fifths, train_cmd

ASYNC_TRAINERS = 2  # trainer ranks of an async cell (plus one inference rank)
_START_LOCK = threading.Lock()  # one start eval per seed, also with --jobs > 1


def async_cell(variant: str, k: int, n: int, seed: int, correction: str) -> dict:
    tag = "" if correction == "tis" else "_notis"
    return {"name": f"{variant}_async{k}{tag}_n{n}_s{seed}", "variant": variant, "k": k, "n": n, "seed": seed,
            "mode": "async", "correction": correction}


def heldout(hf: Path, run: Path, seed: int, eval_n: int) -> tuple[float, str]:
    """avg@eval_n of the model in `hf` on the held-out problems: one eval-only colocated process (reused when
    run/metrics.jsonl already holds its eval row). Returns (value, key)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        _run(train_cmd("--model", str(hf), "--set", "model.arch=''", "--warmup-steps", "0", "--max-steps", "0",
                       "--seed", str(seed), "--out", str(run), "--no-export", "--set", f"rollout.eval_n={eval_n}"),
             run)
    row = next(json.loads(x) for x in path.read_text().splitlines() if x.strip() and '"eval"' in x)
    key = next(k for k in row if k.startswith("avg@"))
    return row[key], key


def run_async_cell(hf: Path, run: Path, cell: dict, args) -> dict:
    """The cell's async run, then its held-out evals; the summary study.py stores in RUN/summary.json."""
    cmd = train_cmd(*cell_flags(hf, run, cell, args), "--mini-batches", "1", "--set", "rollout.mode=async",
                    "--set", f"rollout.max_staleness={cell['k']}", "--set", "data.eval_size=0",
                    "--set", f"loss.rollout_correction={cell['correction']}", procs=ASYNC_TRAINERS + 1)
    wall = _run(cmd, run)
    with _START_LOCK:
        start, key = heldout(hf, hf.parent / f"heldout_n{args.eval_n}", cell["seed"], args.eval_n)
    final, _ = heldout(run / "hf", run / "heldout", cell["seed"], args.eval_n)
    return {**cell, **summarise_async(run / "metrics.jsonl", cell["k"]), "heldout_start": start, "heldout_final": final,
            "avg_key": key, "logratio_min": 0.0, "wall_s": wall}


def summarise_async(path: Path, k: int) -> dict:
    """Rewards, the measured staleness (steps_at_k: share of steps with a sample exactly k updates old) and the
    behaviour-policy gap of the run's train rows."""
    train = [json.loads(x) for x in path.read_text().splitlines() if x.strip() and '"train"' in x]
    first, last = reward_fifths(train)
    return {"reward_first": first, "reward_last": last, "collapsed": last < first - COLLAPSE_DROP,
            "staleness_mean": statistics.fmean(r["staleness_mean"] for r in train),
            "staleness_max": max(r["staleness_max"] for r in train),
            "steps_at_k": sum(r["staleness_max"] == k for r in train) / len(train),
            "overlap_frac": statistics.fmean(r["overlap_frac"] for r in train),
            "is_weight_mean": statistics.fmean(r["rollout_is_weight_mean"] for r in train)
            if "rollout_is_weight_mean" in train[0] else None,
            "reward": [r["reward_mean"] for r in train],
            "logp_diff": [r["rollout_logp_diff_mean"] for r in train]}


def async_table(summaries: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for s in summaries:
        groups.setdefault((s["variant"], s["k"], s["n"], s["correction"]), []).append(s)
    key = next(iter(summaries))["avg_key"] if summaries else "avg@k"
    lines = [f"| variant | max staleness k | n | correction | seeds | batch reward, first fifth | last fifth | "
             f"held-out {key} (eval after the run), start -> end | staleness mean (measured) | max | steps at k | "
             "mean \\|log pi_t - log pi_behaviour\\| / token | TIS weight mean | overlap_frac | collapsed | "
             "wall per cell, s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = list(VARIANTS)
    for (v, k, n, c), ss in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), *kv[0][1:])):
        lines.append(
            f"| {v} | {k} | {n} | {c} | {len(ss)} | {_ms([s['reward_first'] for s in ss])} | "
            f"{_ms([s['reward_last'] for s in ss])} | {_ms([s['heldout_start'] for s in ss])} -> "
            f"{_ms([s['heldout_final'] for s in ss])} | {_ms([s['staleness_mean'] for s in ss])} | "
            f"{max(s['staleness_max'] for s in ss):.0f} | {_ms([s['steps_at_k'] for s in ss])} | "
            f"{_ms([statistics.fmean(s['logp_diff']) for s in ss])} | "
            f"{'-' if c == 'none' else _ms([s['is_weight_mean'] for s in ss])} | "
            f"{_ms([s['overlap_frac'] for s in ss])} | {sum(s['collapsed'] for s in ss)}/{len(ss)} | "
            f"{min(s['wall_s'] for s in ss):.0f}-{max(s['wall_s'] for s in ss):.0f} |")
    return "\n".join(lines) + "\n"


def async_figures(summaries: list[dict], out: Path) -> list[Path]:
    """Figure 4 style (batch reward, mean +- std band over seeds; solid: TIS, dotted: no correction) and the
    behaviour-policy gap per step, one panel per (n, k); `--async-k 0` gives the staleness-0 panel."""
    ks = sorted({s["k"] for s in summaries})
    ns = sorted({s["n"] for s in summaries})
    paths = []
    for key, name, ylabel in (("reward", "study_async_rewards.png", "batch reward"),
                              ("logp_diff", "study_async_logratio.png", "mean |log pi_t - log pi_behav|")):
        def draw(ax, k, n, key=key):
            for c, v in enumerate(VARIANTS):
                for corr, ls in (("tis", "-"), ("none", ":")):
                    ss = [s for s in summaries if (s["variant"], s["k"], s["n"], s["correction"]) == (v, k, n, corr)]
                    if ss:
                        band(ax, [s[key] for s in ss], f"C{c}", v if corr == "tis" else f"{v}, no TIS", ls=ls)
            ax.set_title(f"async, staleness <= {k}, n = {n}", fontsize=9)

        # the last panel has every line
        paths.append(panel_figure(out, name, ylabel, ks, ns, draw, sharey=True, legend_at=(0, -1), legend_size=6))
    return paths
