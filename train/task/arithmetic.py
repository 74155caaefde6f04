"""The offline synthetic arithmetic task of the CPU demo: prompts "a<op>b=", exact-match answers, a fixed
held-out split."""
from __future__ import annotations

import hashlib
import random
from typing import Sequence

from .data import Problem

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


class ArithmeticTask:
    """Offline synthetic task: prompts "a<op>b=" with 0 <= a, b <= max_operand, answers str(a <op> b).

    The train/held-out split is a fixed hash split of (a, op, b) (independent of ``seed``), so ``heldout(n)``
    is the same set in every run and never overlaps ``sample``. ``seed`` seeds ``sample`` when no ``rng`` is
    passed.
    """

    def __init__(self, seed: int = 0, *, max_operand: int = 20, ops: Sequence[str] = ("+",),
                 heldout_fraction: float = 0.1):
        if max_operand < 1:
            raise ValueError(f"max_operand must be >= 1, got {max_operand}")
        if not ops or any(op not in _OPS for op in ops):
            raise ValueError(f"ops must be a non-empty subset of {tuple(_OPS)}, got {ops!r}")
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
        self.max_operand = max_operand
        self.ops = tuple(ops)
        self.heldout_fraction = heldout_fraction
        self._rng = random.Random(seed)
        self._heldout = sorted(
            (t for t in self._all() if self.is_heldout(*t)), key=lambda t: self._hash(*t)
        )
        n_all = (max_operand + 1) ** 2 * len(self.ops)
        if len(self._heldout) in (0, n_all):
            raise ValueError("max_operand/heldout_fraction leave the train or held-out split empty")

    def _all(self):
        r = range(self.max_operand + 1)
        return ((a, op, b) for op in self.ops for a in r for b in r)

    @staticmethod
    def _hash(a: int, op: str, b: int) -> float:
        h = hashlib.sha256(f"fastpmd-arith:{a}{op}{b}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2.0**64  # uniform in [0, 1)

    def is_heldout(self, a: int, op: str, b: int) -> bool:
        return self._hash(a, op, b) < self.heldout_fraction

    @staticmethod
    def make(a: int, op: str, b: int) -> Problem:
        return Problem(prompt=f"{a}{op}{b}=", answer=str(_OPS[op](a, b)), id=f"{a}{op}{b}")

    def sample(self, n: int, rng: random.Random | None = None) -> list[Problem]:
        """``n`` training problems drawn with replacement (never from the held-out split)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = self._rng if rng is None else rng
        out: list[Problem] = []
        while len(out) < n:
            a, b = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
            op = rng.choice(self.ops)
            if not self.is_heldout(a, op, b):
                out.append(self.make(a, op, b))
        return out

    def heldout(self, n: int | None = None) -> list[Problem]:
        """The first ``n`` (all when None) held-out problems, in a fixed order."""
        if n is not None and not 0 <= n <= len(self._heldout):
            raise ValueError(f"n must be in [0, {len(self._heldout)}] for this task, got {n}")
        return [self.make(*t) for t in self._heldout[:n]]
