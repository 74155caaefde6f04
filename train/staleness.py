"""Staleness and overlap bookkeeping of an asynchronous run (plain Python, no process groups).

- staleness of a sample trained at RL step s (the trainer holds the weights of version s - 1, i.e. after s - 1
  pushes) that weights of version v generated: s - 1 - v, the updates between generation and training;
- the bound: the engine may start the batch of step j with version v only if j - 1 - v <= k (it waits otherwise);
- overlap_frac of a step: the share of its wall time in which the trainer worked (not waiting for samples) while
  the engine generated.
"""
from __future__ import annotations

import threading
import time


def staleness(step: int, version: int) -> int:
    """Updates between generation (weights `version`) and training at RL step `step` (weights step - 1)."""
    return step - 1 - version


def min_version(step: int, max_staleness: int) -> int:
    """The oldest weights version the engine may generate step `step`'s batch with."""
    return step - 1 - max_staleness


def covered(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Length of [lo, hi] covered by the union of intervals."""
    cuts = sorted((max(a, lo), min(b, hi)) for a, b in intervals if b > lo and a < hi)
    total, end = 0.0, lo
    for a, b in cuts:
        a = max(a, end)
        if b > a:
            total += b - a
            end = b
    return total


def overlap_frac(window: tuple[float, float], idle: tuple[float, float],
                 generating: list[tuple[float, float]]) -> float:
    """Share of the step's wall time `window` in which the trainer worked (the window less its `idle` wait
    for samples, an interval inside it) and the engine generated (`generating` intervals)."""
    t0, t1 = window
    if t1 <= t0:
        return 0.0
    both = covered(generating, t0, t1) - covered(generating, *idle)
    return max(both, 0.0) / (t1 - t0)


class GenerationTimeline:
    """The engine's generation intervals as a trainer rank learns them (thread-safe): `started(t)` when the engine
    begins a batch, `finished(t0, t1)` with the batch; `intervals(now)` counts a running batch up to now.
    Intervals older than `keep_s` seconds are forgotten."""

    def __init__(self, keep_s: float = 3600.0):
        self.lock = threading.Lock()
        self.done: list[tuple[float, float]] = []
        self.running: float | None = None
        self.keep_s = keep_s

    def started(self, t0: float) -> None:
        with self.lock:
            self.running = t0

    def finished(self, t0: float, t1: float) -> None:
        with self.lock:
            self.done = [iv for iv in self.done if iv[1] > t1 - self.keep_s] + [(t0, t1)]
            if self.running == t0:
                self.running = None

    def intervals(self, now: float | None = None) -> list[tuple[float, float]]:
        now = time.time() if now is None else now
        with self.lock:
            return self.done + ([(self.running, now)] if self.running is not None else [])
