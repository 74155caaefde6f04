"""`fastpmd study`: the paper's stability claim on the CPU task, rerunnable. A thin driver over `fastpmd train`:
every grid cell is one `python -m fastpmd.train` process (the trainer's own CLI and config), nothing else trains.

Grid: variants {pmd-mean (released rloo), pmd-part exact (partition_loo), pmd-part released clamp
(partition_loo_clamped), grpo, pmd-mean with the mean-reward tau schedule} x staleness k (optimizer steps, i.e.
mini-batches, per generation batch) x group size n x seeds. The task is tiny-arith (0/1 rewards) with the released
scripts' tau 0.01 (so gap/tau = 100 > ln 1e8 and the released clamp fires) and P prompts per generation batch.
Each seed's supervised warm-up runs once (`--max-steps 0`, exported to OUT/warmup/seed_S/hf) and every cell of
that seed starts from it (`--model OUT/warmup/seed_S/hf`), so cells differ only in the RL loss and its options.

Outputs in OUT: cells/<variant>_k<k>_n<n>_s<seed>/ (each run's metrics.jsonl), study.json (per-cell summaries),
study_table.md (mean +- std over seeds), study_rewards.png (batch reward per step, band = +-1 std over seeds, as
in the paper's Figure 4) and study_logratio.png (minimum log-ratio of the last mini-batch per step, Figure 5).
Collapse: the last fifth's mean batch reward is below the first fifth's by more than 0.05.
`--async-k K1,K2`: async cells too (rollout staleness <= K; train/study_async.py), reported in their own table and
figures (study_async_*); `--ks ''` runs none of the synchronous ones.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastpmd._cli import ArgumentParser

VARIANTS = {  # name -> `fastpmd train` flags
    "pmd-mean": ["--loss", "pmd-mean", "--estimator", "loo"],
    "pmd-part": ["--loss", "pmd-part", "--estimator", "partition_loo"],
    "pmd-part-clamp": ["--loss", "pmd-part", "--estimator", "partition_loo_clamped"],
    "grpo": ["--loss", "grpo"],
    "pmd-mean-adaptive": ["--loss", "pmd-mean", "--estimator", "loo", "--tau-schedule", "mean-reward"],
}
COLLAPSE_DROP = 0.05


def train_cmd(*flags: str, procs: int = 1) -> list[str]:
    """`fastpmd train` on the demo preset; procs > 1: under torchrun with that many processes."""
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] if procs > 1 else []
    return [sys.executable, *launch, "-m", "fastpmd.train", "--preset", "tiny-arith", "--no-progress", "--no-plots",
            *flags]


def cell_flags(hf: Path, run: Path, cell: dict, args) -> list[str]:
    """The flags every cell shares: its seed's warm-up model, the RL task, the variant's loss."""
    return ["--model", str(hf), "--set", "model.arch=''", "--warmup-steps", "0", "--seed", str(cell["seed"]),
            "--out", str(run), "--max-steps", str(args.steps), "--tau", str(args.tau),
            "--prompts-per-step", str(args.prompts), "--group-size", str(cell["n"]), "--set", "run.save_every=0",
            "--set", f"rollout.eval_n={args.eval_n}", *VARIANTS[cell["variant"]]]


def warmup(out: Path, seed: int, warmup_steps: int | None) -> Path:
    """The seed's warm-up, run once: OUT/warmup/seed_S/hf (skipped when already there)."""
    run = out / "warmup" / f"seed_{seed}"
    if not (run / "hf" / "model.safetensors").is_file():
        extra = [] if warmup_steps is None else ["--warmup-steps", str(warmup_steps)]
        _run(train_cmd("--seed", str(seed), "--max-steps", "0", "--out", str(run), *extra), run)
    return run / "hf"


def _run(cmd: list[str], run: Path) -> float:
    run.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall


def run_cell(out: Path, cell: dict, args) -> dict:
    """One `fastpmd train` run; reuses a finished one (OUT/cells/NAME/summary.json)."""
    run = out / "cells" / cell["name"]
    done = run / "summary.json"
    if done.is_file():
        return json.loads(done.read_text())
    if run.exists():  # an interrupted run: start it again
        import shutil

        shutil.rmtree(run)
    hf = warmup(out, cell["seed"], args.warmup_steps)
    if cell.get("mode") == "async":
        from .study_async import run_async_cell

        summary = run_async_cell(hf, run, cell, args)
    else:
        wall = _run(train_cmd(*cell_flags(hf, run, cell, args), "--mini-batches", str(cell["k"]), "--no-export"), run)
        summary = {**cell, **summarise(run / "metrics.jsonl"), "wall_s": wall}
    done.write_text(json.dumps(summary))
    return summary


def reward_fifths(train: list[dict]) -> tuple[float, float]:
    """Mean batch reward of the first and of the last fifth of the train rows."""
    fifth = max(1, len(train) // 5)
    return (statistics.fmean(r["reward_mean"] for r in train[:fifth]),
            statistics.fmean(r["reward_mean"] for r in train[-fifth:]))


def summarise(path: Path) -> dict:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    first, last = reward_fifths(train)
    avg_key = next(k for k in evals[-1] if k.startswith("avg@"))
    return {"reward_first": first, "reward_last": last, "heldout_start": evals[0][avg_key],
            "heldout_final": evals[-1][avg_key], "avg_key": avg_key,
            "logratio_min": min(r["logratio_min"] for r in train), "collapsed": last < first - COLLAPSE_DROP,
            "reward": [r["reward_mean"] for r in train], "logratio_min_last": [r["logratio_min_last"] for r in train]}


def _ms(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def table(summaries: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for s in summaries:
        groups.setdefault((s["variant"], s["k"], s["n"]), []).append(s)
    key = next(iter(summaries))["avg_key"] if summaries else "avg@k"
    lines = [f"| variant | k | n | seeds | batch reward, first fifth | last fifth | held-out {key}, start -> end | "
             "min log-ratio (run) | collapsed |", "|---|---|---|---|---|---|---|---|---|"]
    order = list(VARIANTS)
    for (v, k, n), ss in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1], kv[0][2])):
        lines.append(f"| {v} | {k} | {n} | {len(ss)} | {_ms([s['reward_first'] for s in ss])} | "
                     f"{_ms([s['reward_last'] for s in ss])} | {_ms([s['heldout_start'] for s in ss])} -> "
                     f"{_ms([s['heldout_final'] for s in ss])} | {_ms([s['logratio_min'] for s in ss])} | "
                     f"{sum(s['collapsed'] for s in ss)}/{len(ss)} |")
    return "\n".join(lines) + "\n"


def band(ax, series: list[list[float]], color: str, label: str, **plot_kw) -> None:
    """Mean per step over the seeds' series, with a +-1 std band (the paper's Figure 4 style)."""
    T = min(len(x) for x in series)
    cols = list(zip(*[x[:T] for x in series]))
    mean = [statistics.fmean(x) for x in cols]
    std = [statistics.pstdev(x) for x in cols]
    steps = range(1, T + 1)
    ax.plot(steps, mean, color=color, label=label, lw=1.2, **plot_kw)
    ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=color,
                    alpha=0.2, lw=0)


def panel_figure(out: Path, name: str, ylabel: str, ks: list[int], ns: list[int], draw, sharey: bool = False,
                 legend_at: tuple[int, int] = (0, 0), legend_size: int = 7) -> Path:
    """OUT/name: one panel per (n, k), n down and k across; `draw(ax, k, n)` fills a panel and sets its title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(ns), len(ks), figsize=(3.6 * len(ks), 2.8 * len(ns)), squeeze=False,
                             sharex=True, sharey=sharey)
    for i, n in enumerate(ns):
        for j, k in enumerate(ks):
            ax = axes[i][j]
            draw(ax, k, n)
            ax.set_xlabel("step", fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.tick_params(labelsize=7)
    axes[legend_at[0]][legend_at[1]].legend(fontsize=legend_size)
    fig.tight_layout()
    path = out / name
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path


def figures(summaries: list[dict], out: Path) -> list[Path]:
    """Figure 4 style (reward, mean +- std band over seeds) and Figure 5 style (min log-ratio, last mini-batch)."""
    ks = sorted({s["k"] for s in summaries})
    ns = sorted({s["n"] for s in summaries})
    paths = []
    for key, name, ylabel in (("reward", "study_rewards.png", "batch reward"),
                              ("logratio_min_last", "study_logratio.png", "min log-ratio, last mini-batch")):
        def draw(ax, k, n, key=key):
            for c, v in enumerate(VARIANTS):
                ss = [s for s in summaries if (s["variant"], s["k"], s["n"]) == (v, k, n)]
                if ss:
                    band(ax, [s[key] for s in ss], f"C{c}", v)
            if key == "logratio_min_last":
                ax.set_yscale("symlog", linthresh=1.0)
            ax.set_title(f"k = {k} mini-batches, n = {n}", fontsize=9)

        paths.append(panel_figure(out, name, ylabel, ks, ns, draw))
    return paths


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="fastpmd study", description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--out", default="runs/study")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
    p.add_argument("--ks", type=ints, default=[1, 4, 16], help="mini-batches per generation batch ('': none)")
    p.add_argument("--async-k", type=ints, default=[], help="async cells: rollout.max_staleness values (1 "
                   "inference + 2 trainer processes, one mini-batch per step; docs/study.md)")
    p.add_argument("--async-correction", default="tis",
                   help="comma list of loss.rollout_correction values (tis, none) for the async cells")
    p.add_argument("--ns", type=ints, default=[4, 16], help="responses per prompt")
    p.add_argument("--seeds", type=ints, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=30, help="RL steps per cell")
    p.add_argument("--prompts", type=int, default=16, help="prompts per generation batch (divisible by every k)")
    p.add_argument("--tau", type=float, default=0.01)
    p.add_argument("--eval-n", type=int, default=16)
    p.add_argument("--warmup-steps", type=int, default=None, help="default: the preset's")
    p.add_argument("--jobs", type=int, default=2, help="cells run at once (one CPU thread each)")
    p.add_argument("--report-only", action="store_true", help="table and figures from the finished cells")
    return p


def main(argv: list[str] | None = None) -> int:
    from .study_async import ASYNC_TRAINERS, async_cell, async_figures, async_table

    args = parser().parse_args(argv)
    variants = args.variants.split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad or any(args.prompts % k for k in args.ks) or args.steps < 1:
        print(f"fastpmd study: error: unknown variants {bad}, or --prompts {args.prompts} not divisible by every "
              f"k in {args.ks}, or --steps < 1", file=sys.stderr)
        return 2
    corrections = args.async_correction.split(",")
    if args.async_k and (args.prompts % ASYNC_TRAINERS or min(args.async_k) < 0
                         or not set(corrections) <= {"tis", "none"}):
        print(f"fastpmd study: error: --prompts {args.prompts} must split over the async cells' {ASYNC_TRAINERS} "
              f"trainer ranks, --async-k {args.async_k} be >= 0 and --async-correction {corrections} in "
              "{tis, none}", file=sys.stderr)
        return 2
    out = Path(args.out)
    cells = [{"name": f"{v}_k{k}_n{n}_s{s}", "variant": v, "k": k, "n": n, "seed": s}
             for s in args.seeds for n in args.ns for k in args.ks for v in variants]
    cells += [async_cell(v, k, n, s, c) for s in args.seeds for n in args.ns for c in corrections
              for k in args.async_k for v in variants]
    if not args.report_only:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / ".study.lock", "w")  # the OS drops the lock if the driver dies
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            print(f"fastpmd study: error: --out {out} is in use by another study driver (two drivers would run "
                  "the same cells at once and spoil them)", file=sys.stderr)
            return 2
        with lock:  # closing it releases the lock
            for s in args.seeds:  # warm-ups first, one at a time (each is a full single-thread run)
                warmup(out, s, args.warmup_steps)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.jobs) as pool:
                for s in pool.map(lambda c: run_cell(out, c, args), cells):
                    print(f"{s['name']}: reward {s['reward_first']:.3f} -> {s['reward_last']:.3f}, held-out "
                          f"{s['heldout_final']:.3f}, min log-ratio {s['logratio_min']:.2f}, {s['wall_s']:.0f} s",
                          flush=True)
            print(f"grid: {len(cells)} cells in {time.perf_counter() - t0:.0f} s wall ({args.jobs} at a time)")
    done = [json.loads((out / "cells" / c["name"] / "summary.json").read_text()) for c in cells
            if (out / "cells" / c["name"] / "summary.json").is_file()]
    (out / "study.json").write_text(json.dumps(done))
    sync = [s for s in done if s.get("mode") != "async"]
    (out / "study_table.md").write_text(table(sync))
    if sync:
        figures(sync, out)
    print(table(sync))
    if args.async_k:
        asy = [s for s in done if s.get("mode") == "async"]
        (out / "study_async_table.md").write_text(async_table(asy))
        if asy:
            async_figures(asy, out)
        print(async_table(asy))
    return 0
