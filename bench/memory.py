"""Peak extra memory of one forward+backward, measured in a fresh process per method.

Peak extra memory = high-water mark during one step minus the baseline with the inputs allocated, after one
warm-up step whose gradients were freed (so lazy initialisation and compilation are not counted, and the
step's own gradients are).

- CPU: resident set size. The worker resets the kernel's RSS high-water mark (write "5" to
  /proc/self/clear_refs), reads the baseline VmRSS, runs the step, reads VmHWM. glibc is told to serve
  allocations >= 64 KiB with mmap (MALLOC_MMAP_THRESHOLD_), so freed warm-up tensors go back to the OS and
  cannot hide the step's own allocations. Without clear_refs (not Linux), the fallback skips the warm-up and
  uses resource.getrusage(...).ru_maxrss; `mem_method` in the row says which was used.
- CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated at the baseline;
  `device_mem_mb` is the device's used memory after the step, read through nvidia-ml-py (driver view: includes
  the caching allocator's reserve and the CUDA context) when that package is installed.

Run as `python -m fastpmd.bench.memory` with a JSON job on stdin; prints one JSON list on the last line.
"""
from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys

import torch

MB = 1024 * 1024
_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "2"}


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _nvml_used_mb(device: torch.device) -> float | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        return pynvml.nvmlDeviceGetMemoryInfo(handle).used / MB
    except Exception:  # noqa: BLE001 - no NVML driver: the figure is left out, never guessed
        return None


def measure_step(step, inp, warm: bool = True) -> dict:
    """Peak extra memory (MB) of one call of `step` over the inputs-only baseline."""
    device = inp.hidden.device
    if device.type == "cuda":
        step()
        inp.zero_grad()
        gc.collect()
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_mem_mb": (peak - base) / MB, "baseline_mb": base / MB,
                "device_mem_mb": _nvml_used_mb(device), "mem_method": "cuda max_memory_allocated"}
    if warm and _reset_hwm():
        step()
        inp.zero_grad()
        gc.collect()
        _reset_hwm()
        base = _status_kb("VmRSS")
        step()
        peak = _status_kb("VmHWM")
        method = "RSS high-water (clear_refs), after warm-up"
    else:
        base = _status_kb("VmRSS") if os.path.exists("/proc/self/status") else 0
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
        method = "ru_maxrss, no warm-up (includes lazy initialisation)"
    return {"peak_mem_mb": max(0, peak - base) / 1024, "baseline_mb": base / 1024, "device_mem_mb": None,
            "mem_method": method}


def run_job(job: dict) -> list[dict]:
    """In this process: for each shape and loss of `job`, build inputs, measure `job["method"]`."""
    from .inputs import make_inputs
    from .methods import get_method, loss_config
    from .presets import Shape

    method, device = get_method(job["method"]), torch.device(job["device"])
    if "threads" in job:
        torch.set_num_threads(job["threads"])
    out = []
    for i, shape_dict in enumerate(job["shapes"]):
        inp = make_inputs(Shape(**shape_dict), device, job.get("seed", 0))
        for loss in job["losses"]:
            res = {"shape": i, "loss": loss, "inputs_mb": inp.nbytes() / MB, "grads_mb": inp.grad_bytes() / MB}
            reason = method.skip_reason(loss, device)
            if reason:
                out.append({**res, "error": reason})
                continue
            try:
                step = method.build(inp, loss_config(loss, job.get("tau", 0.01)))
                res.update(measure_step(step, inp))
            except Exception as exc:  # noqa: BLE001 - reported in the row
                res["error"] = f"error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            del step
            inp.zero_grad()
            gc.collect()
            out.append(res)
        del inp
        gc.collect()
    return out


def measure_in_subprocess(job: dict, timeout_s: float | None = None) -> list[dict]:
    """Run `run_job(job)` in a fresh Python process; an error there comes back as one error result."""
    env = {**os.environ, **_ENV}
    try:
        proc = subprocess.run([sys.executable, "-m", "fastpmd.bench.memory"], input=json.dumps(job), env=env,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return [{"error": f"error: memory worker for {job['method']} exceeded {timeout_s} s"}]
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = " ".join(proc.stderr.strip().splitlines()[-3:])[:400]
        return [{"error": f"error: memory worker exited {proc.returncode}: {tail}"}]
    return json.loads(lines[-1])


def main() -> None:
    print(json.dumps(run_job(json.loads(sys.stdin.read()))))


if __name__ == "__main__":
    main()
