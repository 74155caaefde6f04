"""GPU timing of the fused LM-head PMD loss against its peers, one interleaved run per N (bench/gpu_check.sh).

    python -m fastpmd.bench.gpu_timing --out DIR            # N in {16384, 4096}, H=3584, V=152064, bf16, CUDA
    python -m fastpmd.bench.gpu_timing --device cpu --n 64 --hidden 32 --vocab 301 --dtype float32 --out DIR

For each N: inputs from bench/inputs.py (every position trained, T=1024), then one round-robin (bench/harness.py)
over hidden -> loss forward+backward of: fastpmd-cublas, fastpmd-triton and fastpmd-torch (fused_linear_pmd_loss,
PMD-mean),
Liger's fused linear cross-entropy (reduction="none" log-probs into PMD-mean), Liger's chunked GRPO loss (it
has no PMD loss), Cut Cross-Entropy (`cce` impl on CUDA, log-probs into PMD-mean), naive, and the three plain
matmuls h@W.T, G@W, G.T@h (the floor). Then peak extra memory per method, in this process: one warm step,
reset, one measured step (torch.cuda.max_memory_allocated on CUDA; RSS high-water on CPU; bench/memory.py).
A method that cannot run (package missing, no CUDA) is a skipped row with the reason.

Per row: ms (median, IQR, reps), TFLOP/s (the flops each method really does, bench/methods.py), % of the
floor's speed (100 x floor ms / ms), % of the dense peak (when the device is known), peak extra MiB, warm-up
seconds (compilation). Targets (PASS/FAIL, meaningful on a GPU only), for fastpmd-cublas and fastpmd-triton:
>= 70% of the floor's speed; faster than every peer at equal or lower memory. Writes DIR/gpu_timing.json and DIR/gpu_timing.md after
every N (a run cut short keeps what it measured). Budgets: `--cap-s` bounds each method's timed total per N
(fewer reps for a slow one), `--budget-s` skips the N values that would start after it (the first always runs).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from .harness import Entry, summary, time_entries, timing_row
from .inputs import make_inputs
from .memory import measure_step
from .methods import FLOOR, get_method
from .presets import DTYPES, shape_for_tokens
from .report import _fmt, machine_info

PEAKS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
# method -> loss it runs (Liger's chunked loss has no PMD: its GRPO loss is the closest it offers)
METHOD_LOSS = {"fastpmd-cublas": "pmd-mean", "fastpmd-triton": "pmd-mean", "fastpmd-torch": "pmd-mean",
               "liger-flce": "pmd-mean",
               "liger": "grpo", "cce": "pmd-mean", "naive": "pmd-mean"}
OURS, PEERS = ("fastpmd-cublas", "fastpmd-triton"), ("liger-flce", "liger", "cce", "naive")
FLOOR_SPEED_TARGET = 70.0  # % of the floor's speed
LOSS_RTOL = 2e-2  # OURS' loss vs fastpmd-torch's on the same bf16 inputs (a sanity check, not a test)


def dense_peak(device: torch.device) -> float | None:
    """Dense bf16/fp16 TFLOP/s of a known GPU (None on CPU or an unknown name)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAKS.items() if k in name), None)


def _memory(entry: Entry, inp, device: torch.device) -> dict:
    """Peak extra memory of one step of `entry` (its timed step, kept built; same inputs); drops the step."""
    try:
        res = measure_step(entry.step, inp)
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory: reported in the row
        res = {"mem_error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"}
    entry.step = None
    inp.zero_grad()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def time_shape(n: int, args, device: torch.device, peak: float | None, log) -> list[dict]:
    """One interleaved run at N=n, then memory; the rows (skipped ones with their reason)."""
    t0 = time.perf_counter()
    shape = shape_for_tokens(n, args.hidden, args.vocab, dtype=args.dtype, mask="full", seq_len=min(n, args.seq))
    inp = make_inputs(shape, device, args.seed)
    log(f"N={n}: inputs {time.perf_counter() - t0:.1f} s")
    entries = [Entry(get_method(m), METHOD_LOSS[m]) for m in args.methods] + [Entry(FLOOR, "pmd-mean")]
    reps = args.reps[min(args.n.index(n), len(args.reps) - 1)]
    t1 = time.perf_counter()
    time_entries(entries, inp, args.warmup, reps, cap_s=args.cap_s, keep_steps=True)
    log(f"N={n}: timing {time.perf_counter() - t1:.1f} s (warm-up: "
        + ", ".join(f"{e.method.name} {e.warmup_s:.1f} s" for e in entries if not e.skip) + ")")
    floor = entries[-1]
    floor_ms = summary(floor.times_s)["ms_median"] if floor.times_s else None
    rows, t2 = [], time.perf_counter()
    for e in entries:
        row = timing_row(e, inp, floor_ms)
        row["pct_floor_speed"] = 100 * floor_ms / row["ms_median"] if floor_ms and row["ms_median"] else None
        row["pct_peak"] = 100 * row["tflops"] / peak if peak and row["tflops"] else None
        if not e.skip and e.method is not FLOOR:
            row.update(_memory(e, inp, device))
        rows.append(row)
    floor.step = None
    log(f"N={n}: memory {time.perf_counter() - t2:.1f} s; N={n} total {time.perf_counter() - t0:.1f} s")
    del inp
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _check(name: str, ok: bool | None, detail: str) -> dict:
    verdict = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
    return {"check": name, "verdict": verdict, "line": f"{verdict}  {name}: {detail}"}


def checks(rows: list[dict]) -> list[dict]:
    """The targets per N, for each fastpmd backend timed (OURS): % of the floor's speed; faster than each peer at
    <= its memory; its loss agrees with fastpmd-torch's."""
    out = []
    for n in dict.fromkeys(r["tokens"] for r in rows):
        by = {r["method"]: r for r in rows if r["tokens"] == n}
        for name in [o for o in OURS if o in by] or [OURS[-1]]:
            out += _checks_of(name, n, by)
    return out


def _checks_of(name: str, n: int, by: dict) -> list[dict]:
    ours, out = by.get(name), []
    if ours is None or ours["status"] != "ok":
        why = ours["reason"] if ours else "not run"
        out.append(_check(f"N={n} {name} >= {FLOOR_SPEED_TARGET:.0f}% of floor speed", None, why))
        return out + [_check(f"N={n} {name} faster than {p} at <= memory", None, why) for p in PEERS if p in by]
    ref = by.get("fastpmd-torch")
    if ref is not None and ref.get("loss_value") is not None and ours.get("loss_value") is not None:
        a, b = ours["loss_value"], ref["loss_value"]
        agree = abs(a - b) <= LOSS_RTOL * max(1.0, abs(b))
        out.append(_check(f"N={n} {name} loss agrees with fastpmd-torch", agree,
                          f"{a:.6g} vs {b:.6g} (rtol {LOSS_RTOL})"))
    pct = ours["pct_floor_speed"]
    out.append(_check(f"N={n} {name} >= {FLOOR_SPEED_TARGET:.0f}% of floor speed",
                      None if pct is None else pct >= FLOOR_SPEED_TARGET, f"{_fmt(pct)}%"))
    for p in PEERS:
        peer = by.get(p)
        if peer is None:
            continue
        if peer["status"] != "ok" or peer.get("peak_mem_mb") is None or ours.get("peak_mem_mb") is None:
            why = peer["reason"] or peer.get("mem_error") or ours.get("mem_error") or "no memory figure"
            out.append(_check(f"N={n} {name} faster than {p} at <= memory", None, why))
            continue
        ok = ours["ms_median"] < peer["ms_median"] and ours["peak_mem_mb"] <= peer["peak_mem_mb"]
        out.append(_check(f"N={n} {name} faster than {p} at <= memory", ok,
                          f"{_fmt(ours['ms_median'])} vs {_fmt(peer['ms_median'])} ms, "
                          f"{_fmt(ours['peak_mem_mb'])} vs {_fmt(peer['peak_mem_mb'])} MiB"))
    return out


def markdown(result: dict) -> str:
    """One table per N, then skipped rows with reasons, the checks and the phase times."""
    meta = result["meta"]
    out = ["# fastpmd gpu_timing", "", f"Command: `{meta['command']}`", "",
           f"Device: {meta.get('gpu') or meta.get('cpu')}; " + ", ".join(f"{k} {v}" for k, v in
                                                                         meta["versions"].items() if v), ""]
    skipped = []
    for n in dict.fromkeys(r["tokens"] for r in result["rows"]):
        rs = [r for r in result["rows"] if r["tokens"] == n]
        r0 = rs[0]
        out += [f"## N={n}, H={r0['hidden']}, V={r0['vocab']}, {r0['dtype']}, forward+backward", "",
                "| method | loss | median ms | IQR ms | reps | TFLOP/s | % floor speed | % peak | peak extra MiB "
                "| warm-up s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rs:
            if r["status"] != "ok":
                skipped.append(f"- N={n} {r['method']} / {r['loss']}: {r['reason']}")
                continue
            out.append(f"| {r['method']} | {r['loss']} | {_fmt(r['ms_median'])} | {_fmt(r['ms_q1'])}-"
                       f"{_fmt(r['ms_q3'])} | {r['reps']} | {_fmt(r['tflops'])} | {_fmt(r['pct_floor_speed'])} | "
                       f"{_fmt(r['pct_peak'])} | {_fmt(r.get('peak_mem_mb'))} | {_fmt(r['warmup_s'])} |")
        out.append("")
    if skipped:
        out += ["Skipped:", *skipped, ""]
    out += ["Checks:", "", *(f"    {c['line']}" for c in result["checks"]), "",
            "Phases: " + ", ".join(f"{p['phase']} {p['seconds']:.1f} s" for p in result["phases"]), ""]
    return "\n".join(out)


def write(result: dict, out_dir: Path) -> None:
    result["checks"] = checks(result["rows"])
    (out_dir / "gpu_timing.json").write_text(json.dumps(result, indent=1))
    (out_dir / "gpu_timing.md").write_text(markdown(result))


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastpmd.bench.gpu_timing", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[16384, 4096],
                   help="tokens N (all trained); the default runs the roofline's N first (compilation is paid there)")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence T")
    p.add_argument("--hidden", type=int, default=3584)
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a dry run of the same code path)")
    p.add_argument("--methods", nargs="+", choices=tuple(METHOD_LOSS), default=list(METHOD_LOSS))
    p.add_argument("--warmup", type=int, default=2, help="warm-up calls per method (compilation happens here)")
    p.add_argument("--reps", type=int, nargs="+", default=[5, 10], help="timed rounds, one value per --n")
    p.add_argument("--cap-s", type=float, default=20.0, help="max timed seconds per method and N")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new N after this many seconds (the first N always runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.environ.get("OUT"), help="output directory (default: $OUT)")
    a = p.parse_args(argv)
    if not a.out:
        p.error("--out (or $OUT) is required")
    if min(a.n) < 1 or a.warmup < 1 or min(a.reps) < 1 or a.cap_s <= 0:
        p.error("--n, --warmup, --reps must be >= 1 and --cap-s > 0")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.device not in ("cuda", "cpu"):
        print(f"gpu_timing: --device must be cuda or cpu, got {args.device!r}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_timing: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "gpu_timing.json").write_text("{}")
    except OSError as exc:
        print(f"gpu_timing: --out {args.out}: not writable ({exc.strerror})", file=sys.stderr)
        return 2
    device, start = torch.device(args.device), time.perf_counter()
    peak = dense_peak(device)
    meta = machine_info(device)
    meta["command"] = "python -m fastpmd.bench.gpu_timing " + " ".join(sys.argv[1:] if argv is None else argv)
    meta["dense_peak_tflops"] = peak
    result = {"meta": meta, "rows": [], "checks": [], "phases": []}

    def log(msg: str) -> None:
        print(f"gpu_timing [{time.perf_counter() - start:6.1f} s] {msg}", flush=True)

    log(f"device {meta.get('gpu') or 'cpu'}, dense peak {peak} TFLOP/s; methods {' '.join(args.methods)}")
    for method in args.methods:
        reason = get_method(method).unavailable(device)
        if reason:
            log(f"skipping {method}: {reason}")
    for n in args.n:
        t0 = time.perf_counter()
        if args.budget_s is not None and result["rows"] and t0 - start > args.budget_s:
            log(f"N={n}: not started, the --budget-s {args.budget_s:.0f} s is spent")
            result["phases"].append({"phase": f"N={n} (skipped: budget)", "seconds": 0.0})
            continue
        result["rows"] += time_shape(n, args, device, peak, log)
        result["phases"].append({"phase": f"N={n}", "seconds": time.perf_counter() - t0})
        write(result, out_dir)
    write(result, out_dir)
    print(markdown(result))
    log(f"wrote {out_dir / 'gpu_timing.json'} and {out_dir / 'gpu_timing.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
