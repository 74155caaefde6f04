"""`python -m fastpmd.bench.auto_pick --timing OUT/gpu_timing.json`: `auto`'s backend next to the fastest one.

For each N of a gpu_timing run: the cost model's PREDICTED ms per method (fastpmd/cost_model.py, this GPU's
assumed rates) beside the MEASURED median, the backend `auto` picks by prediction, the backend it picks with
FASTPMD_AUTOTUNE=1 (both timed once on this device: fastpmd/auto_backend.py), and which fastpmd backend was
measured fastest. Writes OUT/auto_pick.md. Without CUDA (the CPU dry run) it prints the predictions and SKIPs
the autotune. Exit 0 unless the timing file is unreadable (2).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fastpmd import auto_backend, cost_model

_MODEL_NAME = {"fastpmd-cublas": "cublas", "fastpmd-triton": "triton", "fastpmd-torch": "torch",
               "matmul-floor": "floor", "liger-flce": "liger",
               "cce": "cce"}
_DTYPE = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def lines_for(rows: list[dict], gpu: cost_model.GpuRates, device: str, seq: int | None) -> list[str]:
    """Report lines for one N (rows of gpu_timing.json with the same token count)."""
    r0 = rows[0]
    n, H, V, dtype = r0["tokens"], r0["hidden"], r0["vocab"], _DTYPE[r0["dtype"]]
    shape = auto_backend.shape_of("pmd", n, H, V, dtype, seq)
    out = [f"## N={n}, H={H}, V={V}, {r0['dtype']} ({gpu.name} rates, TF32 {'on' if shape.tf32 else 'off'})", "",
           "| method | PREDICTED ms | MEASURED median ms |", "|---|---|---|"]
    measured = {r["method"]: r["ms_median"] for r in rows if r["status"] == "ok"}
    for method, model in _MODEL_NAME.items():
        pred = cost_model.predict(model, shape, gpu)["total_s"] * 1e3
        got = measured.get(method)
        out.append(f"| {method} | {pred:.1f} | {'-' if got is None else f'{got:.1f}'} |")
    out += ["", f"auto (predicted): fastpmd-{cost_model.predicted_fastest(shape, gpu)}"]
    if device == "cuda" and torch.cuda.is_available():
        tuned = auto_backend.cuda_choice("pmd", torch.device("cuda"), n, H, V, dtype, seq, allow_measure=True) \
            if auto_backend.autotune_enabled() else "SKIP (FASTPMD_AUTOTUNE unset)"
        out.append(f"auto (FASTPMD_AUTOTUNE=1, timed once): fastpmd-{tuned}")
    else:
        out.append("auto (FASTPMD_AUTOTUNE=1): SKIP (no CUDA)")
    mine = {m: t for m, t in measured.items() if m.startswith("fastpmd-")}
    best = min(mine, key=mine.get) if mine else None
    out += [f"fastest fastpmd backend measured: {best or 'none measured'}", ""]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fastpmd.bench.auto_pick", description=__doc__.splitlines()[0])
    p.add_argument("--timing", required=True, type=Path, help="gpu_timing.json of the same device")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence in the timing run (its --seq)")
    a = p.parse_args(argv)
    try:
        result = json.loads(a.timing.read_text())
    except (OSError, ValueError) as e:
        print(f"auto_pick: cannot read --timing {a.timing}: {e}", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if a.device == "cuda" and torch.cuda.is_available() else "H100"
    gpu = cost_model.gpu_rates(name)
    out = ["# auto's pick vs the fastest (PREDICTED figures are the cost model's, MEASURED from gpu_timing)", ""]
    for n in dict.fromkeys(r["tokens"] for r in result["rows"]):
        out += lines_for([r for r in result["rows"] if r["tokens"] == n], gpu, a.device, a.seq)
    text = "\n".join(out)
    print(text)
    (a.timing.parent / "auto_pick.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
