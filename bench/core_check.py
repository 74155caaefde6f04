"""`fastpmd bench --preset core-check`: the two measurements of the core issue, with PASS/FAIL lines.

1. Time, N=2048, H=512, V=32768 fp32, hidden -> PMD-mean loss forward+backward, one round-robin run:
   fastpmd's default backend <= 1.1 x the fastest of {naive (PMD-mean), Liger chunked GRPO loss (its closest
   loss: it has no PMD), Cut Cross-Entropy (PMD-mean on its log-probs)}, and <= 1.25 x the three matmuls.
2. Peak extra memory, N=4096, H=1024, V=65536 fp32 (fresh process per method): fastpmd at least 6 x below
   naive, and at most 1.5 x the gradients themselves (grad_hidden + grad_weight) plus 128 MB.
"""
from __future__ import annotations

import dataclasses
import sys

import torch

from .harness import Entry, summary, time_entries, timing_row
from .inputs import make_inputs
from .memory import measure_in_subprocess
from .methods import FLOOR, METHODS, default_backend_method
from .presets import CORE_MEM_SHAPE, CORE_TIME_SHAPE, Preset

MB = 2 ** 20
TIME_VS_PEERS, TIME_VS_FLOOR = 1.10, 1.25
MEM_VS_NAIVE, MEM_GRAD_FACTOR, MEM_SLACK_MB = 6.0, 1.5, 128.0


def _check(name: str, value: float | None, target: str, ok: bool | None) -> dict:
    verdict = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
    shown = "n/a" if value is None else f"{value:.3f}"
    return {"check": name, "value": value, "target": target, "verdict": verdict,
            "line": f"{verdict}  {name}: {shown} (target {target})"}


def time_check(preset: Preset, device: torch.device, tick=lambda n: None) -> tuple[list[dict], list[dict]]:
    """Round-robin timing of fastpmd (default backend), naive, Liger GRPO, CCE and the floor; rows, checks."""
    fast = default_backend_method(device)
    entries = [Entry(fast, "pmd-mean"), Entry(METHODS["naive"], "pmd-mean"), Entry(METHODS["liger"], "grpo"),
               Entry(METHODS["cce"], "pmd-mean"), Entry(FLOOR, "pmd-mean")]
    inp = make_inputs(CORE_TIME_SHAPE, device)
    time_entries(entries, inp, preset.warmup, preset.reps, tick)
    floor_ms = summary(entries[-1].times_s)["ms_median"] if entries[-1].times_s else None
    rows = [timing_row(e, inp, floor_ms) for e in entries]
    ms = {(r["method"], r["loss"]): r["ms_median"] for r in rows}
    t_fast = ms[(fast.name, "pmd-mean")]
    peers = {k: v for k, v in ms.items() if k[0] in ("naive", "liger", "cce") and v is not None}
    checks = []
    if t_fast is None or not peers:
        checks.append(_check("time fastpmd / fastest peer", None, f"<= {TIME_VS_PEERS}", None))
    else:
        best = min(peers, key=peers.get)
        r = t_fast / peers[best]
        checks.append(_check(f"time {fast.name} / fastest peer ({best[0]} {best[1]})", r, f"<= {TIME_VS_PEERS}",
                             r <= TIME_VS_PEERS))
    r = t_fast / floor_ms if t_fast and floor_ms else None
    checks.append(_check(f"time {fast.name} / three matmuls", r, f"<= {TIME_VS_FLOOR}",
                         None if r is None else r <= TIME_VS_FLOOR))
    return rows, checks


def memory_check(device: torch.device) -> tuple[dict[str, dict], list[dict]]:
    """Peak extra memory of fastpmd (default backend) and naive at the memory shape; results, checks."""
    fast = default_backend_method(device)
    res = {}
    for name in (fast.name, "naive"):
        job = {"method": name, "device": str(device), "shapes": [dataclasses.asdict(CORE_MEM_SHAPE)],
               "losses": ["pmd-mean"], "threads": torch.get_num_threads()}
        res[name] = measure_in_subprocess(job)[0]
    f_mb, n_mb = res[fast.name].get("peak_mem_mb"), res["naive"].get("peak_mem_mb")
    grads_mb = res[fast.name].get("grads_mb")
    checks = []
    r = n_mb / f_mb if f_mb and n_mb else None
    checks.append(_check(f"memory naive / {fast.name}", r, f">= {MEM_VS_NAIVE}",
                         None if r is None else r >= MEM_VS_NAIVE))
    if f_mb is None or grads_mb is None:
        checks.append(_check(f"memory {fast.name} MB", None, "<= 1.5 x grads + 128 MB", None))
    else:
        limit = MEM_GRAD_FACTOR * grads_mb + MEM_SLACK_MB
        checks.append(_check(f"memory {fast.name} MB (grads {grads_mb:.0f} MB)", f_mb,
                             f"<= {MEM_GRAD_FACTOR} x grads + {MEM_SLACK_MB:.0f} = {limit:.0f} MB", f_mb <= limit))
    return res, checks


def memory_rows(res: dict[str, dict], device: torch.device) -> list[dict]:
    s = CORE_MEM_SHAPE
    rows = []
    for name, r in res.items():
        rows.append({"method": name, "loss": "pmd-mean", "tokens": s.rows, "rows": s.rows, "batch": s.batch,
                     "seq_len": s.seq_len, "hidden": s.hidden, "vocab": s.vocab, "dtype": s.dtype, "mask": s.mask,
                     "device": str(device), "status": "skipped" if "error" in r else "ok",
                     "reason": r.get("error", ""), "note": "", "phase": "memory", "ms_per_token": None,
                     "ms_median": None, "tflops": None, "ratio_to_floor": None,
                     "peak_mem_mb": r.get("peak_mem_mb"), "grads_mb": r.get("grads_mb"),
                     "inputs_mb": r.get("inputs_mb"), "device_mem_mb": r.get("device_mem_mb"),
                     "mem_method": r.get("mem_method")})
    return rows


def run_core_check(preset: Preset, device: torch.device, memory: bool = True,
                   quiet: bool = False) -> tuple[list[dict], list[dict]]:
    """Both measurements; returns (rows, checks) and prints one PASS/FAIL/SKIP line per check."""
    try:
        from tqdm import tqdm
        bar = tqdm(total=5 * (preset.warmup + preset.reps), desc="core-check timing", file=sys.stderr,
                   disable=quiet, leave=False)
    except ImportError:
        bar = None
    rows, checks = time_check(preset, device, bar.update if bar else (lambda n: None))
    if bar:
        bar.close()
    if memory:
        if not quiet:
            print("core-check: peak memory at N=4096, H=1024, V=65536 (fresh process per method)...",
                  file=sys.stderr)
        res, mem_checks = memory_check(device)
        rows += memory_rows(res, device)
        checks += mem_checks
    for c in checks:
        print(c["line"])
    return rows, checks
