"""A benchmark run: every shape x loss timed round-robin across methods (plus the matmul floor), then peak
memory measured in one fresh process per method. Returns the results rows."""
from __future__ import annotations

import dataclasses
import sys

import torch

from .harness import Entry, summary, time_entries, timing_row
from .inputs import make_inputs
from .memory import measure_in_subprocess
from .methods import FLOOR, METHODS, get_method
from .presets import LOSSES, Shape


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Options of one run. `methods` from methods.METHODS; the matmul floor is added when `floor`."""

    shapes: tuple[Shape, ...]
    methods: tuple[str, ...] = tuple(METHODS)
    losses: tuple[str, ...] = LOSSES
    warmup: int = 2
    reps: int = 5
    device: str = "cpu"
    memory: bool = True
    floor: bool = True
    seed: int = 0
    tau: float = 0.01
    quiet: bool = False
    mem_timeout_s: float | None = 1800.0

    def __post_init__(self):
        if not self.shapes:
            raise ValueError("shapes must not be empty")
        for m in self.methods:
            get_method(m)
        for loss in self.losses:
            if loss not in LOSSES:
                raise ValueError(f"losses must be among {LOSSES}, got {loss!r}")
        if self.warmup < 1 or self.reps < 1:
            raise ValueError(f"warmup and reps must be >= 1, got {self.warmup} and {self.reps}")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} asked for but CUDA is not available")


def _progress(total: int, desc: str, quiet: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, file=sys.stderr, disable=quiet, leave=False)


def announce_skips(cfg: BenchConfig) -> None:
    """Print once per method why it will not run (package missing, no CUDA); such rows are reported skipped."""
    device = torch.device(cfg.device)
    for name in cfg.methods:
        reason = get_method(name).unavailable(device)
        if reason and not cfg.quiet:
            print(f"fastpmd bench: skipping {name}: {reason}", file=sys.stderr)


def time_all(cfg: BenchConfig) -> list[dict]:
    """Timing rows for every shape x loss x method (skipped ones included, with their reason)."""
    device = torch.device(cfg.device)
    methods = [get_method(m) for m in cfg.methods] + ([FLOOR] if cfg.floor else [])
    runnable = sum(1 for _ in cfg.shapes for loss in cfg.losses for m in methods if not m.skip_reason(loss, device))
    bar = _progress(runnable * (cfg.warmup + cfg.reps), "timing", cfg.quiet)
    tick = bar.update if bar is not None else (lambda n: None)
    rows = []
    for si, shape in enumerate(cfg.shapes):
        inp = make_inputs(shape, device, cfg.seed)
        for loss in cfg.losses:
            if bar is not None:
                bar.set_description(f"timing {loss} N={shape.rows}")
            entries = [Entry(m, loss, cfg.tau) for m in methods]
            time_entries(entries, inp, cfg.warmup, cfg.reps, tick)
            floor = next((e for e in entries if e.method is FLOOR and e.times_s), None)
            floor_ms = summary(floor.times_s)["ms_median"] if floor else None
            for e in entries:
                row = timing_row(e, inp, floor_ms)
                row["shape_index"] = si
                rows.append(row)
        del inp
    if bar is not None:
        bar.close()
    return rows


def add_memory(rows: list[dict], cfg: BenchConfig) -> None:
    """Fill peak_mem_mb (and device_mem_mb) of the timed rows: one fresh process per method."""
    device = torch.device(cfg.device)
    names = [m for m in cfg.methods if not get_method(m).unavailable(device)]
    bar = _progress(len(names), "memory", cfg.quiet)
    shapes = [dataclasses.asdict(s) for s in cfg.shapes]
    for name in names:
        if bar is not None:
            bar.set_description(f"memory {name}")
        losses = [loss for loss in cfg.losses if not get_method(name).skip_reason(loss, device)]
        if losses:
            job = {"method": name, "device": cfg.device, "shapes": shapes, "losses": losses, "seed": cfg.seed,
                   "tau": cfg.tau, "threads": torch.get_num_threads()}
            results = measure_in_subprocess(job, cfg.mem_timeout_s)
            for res in results:
                for row in rows:
                    if row["method"] != name or ("shape" in res and (row["shape_index"], row["loss"])
                                                 != (res["shape"], res["loss"])):
                        continue
                    if "error" in res:
                        row["mem_error"] = res["error"]
                    else:
                        row.update({k: res[k] for k in ("peak_mem_mb", "device_mem_mb", "mem_method")})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()


def run(cfg: BenchConfig) -> list[dict]:
    """Timing, then (unless cfg.memory is False) memory. Rows in shape, loss, method order."""
    announce_skips(cfg)
    rows = time_all(cfg)
    if cfg.memory:
        add_memory(rows, cfg)
    return rows
