"""Wall time per RL step, colocated vs async, at equal work (docs/training.md, "Asynchronous rollouts").

    python -m fastpmd.bench.async_timing OUT_DIR [--steps 10] [-- extra fastpmd train flags]

Runs the tiny demo three ways under torchrun on this machine's CPUs: colocated on 2 ranks, async with 1
inference + 2 trainer ranks at max_staleness 0 and 1; the same prompts, group size, tokens and steps. A step's
wall time is the gap between the arrival of consecutive train rows in metrics.jsonl (polled every 20 ms), so
start-up, the first step and the end are left out. Prints one JSON line per run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORK = ["--preset", "tiny-arith", "--prompts-per-step", "16", "--group-size", "4", "--mini-batches", "1",
        "--warmup-steps", "0", "--max-new-tokens", "8", "--no-progress", "--no-plots", "--no-export",
        "--set", "data.eval_size=0"]
RUNS = {"colocated (2 ranks)": (2, []),
        "async k=0 (1+2 ranks)": (3, ["--set", "rollout.mode=async", "--set", "rollout.max_staleness=0"]),
        "async k=1 (1+2 ranks)": (3, ["--set", "rollout.mode=async", "--set", "rollout.max_staleness=1"])}


def run(name: str, nproc: int, flags: list[str], out: Path, steps: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "fastpmd.train", *WORK, "--max-steps", str(steps), "--out", str(out), *flags, *extra]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    arrivals, seen, metrics = [], 0, out / "metrics.jsonl"
    while proc.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        arrivals += [(time.perf_counter(), json.loads(x)) for x in lines[seen:] if x.endswith("}")]
        seen = len(arrivals)
        time.sleep(0.02)
    if proc.returncode:
        raise SystemExit(f"{name} failed: {proc.stderr.read()[-2000:]}")
    lines = metrics.read_text().splitlines()
    arrivals += [(time.perf_counter(), json.loads(x)) for x in lines[seen:]]
    train = [(t, r) for t, r in arrivals if r["kind"] == "train"]
    gaps = [b[0] - a[0] for a, b in zip(train, train[1:])]
    rows = [r for _, r in train[1:]]
    mean = lambda k: statistics.fmean(r[k] for r in rows) if k in rows[0] else None  # noqa: E731
    return {"run": name, "steps_timed": len(gaps), "step_s_mean": statistics.fmean(gaps),
            "step_s_median": statistics.median(gaps), "staleness_mean": mean("staleness_mean"),
            "overlap_frac": mean("overlap_frac"), "trainer_idle_s": mean("trainer_idle_s"),
            "engine_idle_s": mean("engine_idle_s"), "engine_gen_s": mean("engine_gen_s"),
            "update_s": mean("update_s")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("extra", nargs="*", help="more fastpmd train flags (after --)")
    a = p.parse_args()
    for name, (nproc, flags) in RUNS.items():
        out = Path(a.out) / name.split(" (")[0].replace(" ", "_").replace("=", "")
        print(json.dumps(run(name, nproc, flags, out, a.steps, a.extra)), flush=True)


if __name__ == "__main__":
    main()
