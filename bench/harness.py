"""Timing: warm-up, then interleaved (round-robin) repetitions of every entry, median and spread.

An entry is one (method, loss) on one set of inputs. Interleaving means repetition r of every entry runs before
repetition r+1 of any, so a slow phase of a shared machine hits all of them alike.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import torch

from .inputs import Inputs
from .methods import Method, Step, loss_config


@dataclasses.dataclass
class Entry:
    """One (method, loss) to time. After `time_entries`: `times_s` filled, or `skip` saying why not."""

    method: Method
    loss: str
    tau: float = 0.01
    step: Step | None = None
    flops: float = 0.0
    loss_value: float | None = None
    times_s: list[float] = dataclasses.field(default_factory=list)
    skip: str | None = None
    warmup_s: float = 0.0  # wall time of the warm-up calls (compilation included)

    @property
    def key(self) -> tuple[str, str]:
        return self.method.name, self.loss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step: Step, device: torch.device) -> tuple[float, torch.Tensor]:
    _sync(device)
    t0 = time.perf_counter()
    out = step()
    _sync(device)
    return time.perf_counter() - t0, out


def _error(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"error: {type(exc).__name__}: {text[:300]}"


def _release(device: torch.device, e: Entry) -> None:
    """After a failure (often out of memory), give the allocator's cache back so the next method starts clean."""
    if e.skip and device.type == "cuda":
        torch.cuda.empty_cache()


def prepare(entries: list[Entry], inp: Inputs) -> None:
    """Build every entry's step (skips carry their reason; a build error becomes the skip reason)."""
    device = inp.hidden.device
    for e in entries:
        e.skip = e.method.skip_reason(e.loss, device)
        if e.skip:
            continue
        try:
            cfg = loss_config(e.loss, e.tau)
            e.step = e.method.build(inp, cfg)
            e.flops = e.method.flops(inp, cfg)
        except Exception as exc:  # noqa: BLE001 - any failure of a peer library is reported, not raised
            e.skip = _error(exc)


def time_entries(entries: list[Entry], inp: Inputs, warmup: int, reps: int,
                 tick: Callable[[int], None] = lambda n: None, cap_s: float | None = None,
                 keep_steps: bool = False) -> None:
    """Warm each entry up `warmup` times (compile and allocator warm-up happen here), then `reps` rounds.

    `cap_s` (optional) bounds each entry's timed total: an entry whose repetitions already add up to `cap_s`
    seconds sits out the remaining rounds (it keeps at least one repetition), so a slow method cannot eat a
    fixed time budget; the row's `reps` says how many it got. `keep_steps` leaves each live entry's step built
    (for a memory measurement in the same process), instead of dropping it.
    """
    if warmup < 1 or reps < 1:
        raise ValueError(f"warmup and reps must be >= 1, got warmup={warmup}, reps={reps}")
    prepare(entries, inp)
    device = inp.hidden.device
    for e in entries:
        if e.skip:
            continue
        try:
            for _ in range(warmup):
                dt, out = _timed(e.step, device)
                e.warmup_s += dt
                tick(1)
            e.loss_value = float(out)
        except Exception as exc:  # noqa: BLE001 - e.g. torch.compile failing on this platform
            e.skip, e.step = _error(exc), None
            tick(warmup)
        _release(device, e)
    live = [e for e in entries if not e.skip]
    for _ in range(reps):
        for e in live:
            if e.skip or (cap_s is not None and sum(e.times_s) >= cap_s):
                tick(1)
                continue
            try:
                dt, _ = _timed(e.step, device)
                e.times_s.append(dt)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory in a later repetition
                e.skip, e.step, e.times_s = _error(exc), None, []
                _release(device, e)
            tick(1)
    for e in entries:
        if not keep_steps or e.skip:
            e.step = None
    inp.zero_grad()


def summary(times_s: list[float]) -> dict[str, float]:
    """Median, quartiles, min and max in milliseconds."""
    ms = sorted(t * 1e3 for t in times_s)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        q1 = q3 = ms[0]
    return {"ms_median": statistics.median(ms), "ms_q1": q1, "ms_q3": q3, "ms_min": ms[0], "ms_max": ms[-1]}


def timing_row(e: Entry, inp: Inputs, floor_ms: float | None) -> dict:
    """The timing part of a results row for entry `e` (None figures when it was skipped)."""
    s = inp.shape
    row = {"method": e.method.name, "loss": e.loss, "tokens": inp.tokens, "rows": s.rows, "batch": s.batch,
           "seq_len": s.seq_len, "hidden": s.hidden, "vocab": s.vocab, "dtype": s.dtype, "mask": s.mask,
           "device": str(inp.hidden.device), "status": "skipped" if e.skip else "ok", "reason": e.skip or "",
           "note": e.method.note(inp.hidden.device), "reps": len(e.times_s), "ms_per_token": None,
           "ms_median": None, "ms_q1": None, "ms_q3": None, "ms_min": None, "ms_max": None, "flops": None,
           "tflops": None, "floor_ms": floor_ms, "ratio_to_floor": None, "loss_value": e.loss_value,
           "peak_mem_mb": None, "grads_mb": inp.grad_bytes() / 2**20, "inputs_mb": inp.nbytes() / 2**20,
           "device_mem_mb": None, "mem_method": None, "warmup_s": e.warmup_s}
    if e.skip or not e.times_s:
        return row
    stats = summary(e.times_s)
    row.update(stats)
    row["ms_per_token"] = stats["ms_median"] / inp.tokens
    row["flops"] = e.flops
    row["tflops"] = e.flops / (stats["ms_median"] * 1e-3) / 1e12
    if floor_ms:
        row["ratio_to_floor"] = stats["ms_median"] / floor_ms
    return row
