"""Benchmark shapes: one frozen `Shape` per measured problem, and the named presets that list them.

A shape is B sequences of T positions (N = B*T rows of hidden states), hidden size H and vocabulary V.
`mask="ragged"` gives every sequence a response length drawn in [T/4, T] (right padding), the way a
rollout batch looks; `mask="full"` makes every position a trained token (N tokens exactly).
"""
from __future__ import annotations

import dataclasses

from fastpmd.objectives import LOSS_NAMES

DTYPES = ("float32", "bfloat16", "float16")
MASKS = ("full", "ragged")
LOSSES = tuple(name for name in LOSS_NAMES if name != "pg")  # the library's names; pg (on-policy) is not timed
DEFAULT_LOSSES = ("pmd-mean", "pmd-part", "grpo", "gspo")  # what a preset times unless --losses names others

# Real LM heads: (hidden, vocab).
MODEL_HEADS = {
    "qwen2.5-7b": (3584, 152064),
    "qwen3-30b-a3b": (2048, 151936),
    "llama-3-8b": (4096, 128256),
}
PRESET_NAMES = (*MODEL_HEADS, "cpu-small", "core-check", "tiny")


@dataclasses.dataclass(frozen=True)
class Shape:
    """One problem size. `seq_len` T and `batch` B give N = B*T rows; `group_size` responses share a prompt."""

    batch: int
    seq_len: int
    hidden: int
    vocab: int
    dtype: str = "float32"
    mask: str = "ragged"
    group_size: int = 8

    def __post_init__(self):
        for name in ("batch", "seq_len", "hidden", "vocab", "group_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {self.mask!r}")
        if self.batch % self.group_size:
            raise ValueError(f"group_size {self.group_size} must divide batch {self.batch}")

    @property
    def rows(self) -> int:
        """N = B*T rows of hidden states (trained and padding positions)."""
        return self.batch * self.seq_len

    def label(self) -> str:
        return f"N={self.rows} H={self.hidden} V={self.vocab} {self.dtype} mask={self.mask}"


def shape_for_tokens(tokens: int, hidden: int, vocab: int, *, dtype: str = "float32", mask: str = "ragged",
                     seq_len: int | None = None) -> Shape:
    """The shape with N = `tokens` rows: sequences of `seq_len` (default min(N, 1024)) in groups of up to 8."""
    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
    seq_len = seq_len or min(tokens, 1024)
    if tokens % seq_len:
        raise ValueError(f"tokens {tokens} must be a multiple of seq_len {seq_len}")
    batch = tokens // seq_len
    group = max(g for g in (8, 4, 2, 1) if batch % g == 0)
    return Shape(batch, seq_len, hidden, vocab, dtype, mask, group)


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named list of shapes with the defaults that suit them (methods, losses, repetitions)."""

    name: str
    shapes: tuple[Shape, ...]
    losses: tuple[str, ...] = DEFAULT_LOSSES
    warmup: int = 2
    reps: int = 5


def preset(name: str, tokens: tuple[int, ...] = (), dtype: str | None = None, mask: str | None = None) -> Preset:
    """Build preset `name`. Model presets need `tokens` (the N values); the others have fixed shapes."""
    if name in MODEL_HEADS:
        if not tokens:
            raise ValueError(f"preset {name!r} needs tokens (e.g. --tokens 4096 16384)")
        hidden, vocab = MODEL_HEADS[name]
        shapes = tuple(shape_for_tokens(n, hidden, vocab, dtype=dtype or "bfloat16", mask=mask or "ragged")
                       for n in tokens)
        return Preset(name, shapes)
    if name == "cpu-small":
        # Sized for a 2-core CPU: the whole preset (compile included) finishes in a few minutes.
        ns = tokens or (256, 512, 1024)
        shapes = tuple(shape_for_tokens(n, 256, 16384, dtype=dtype or "float32", mask=mask or "ragged",
                                        seq_len=128) for n in ns)
        return Preset(name, shapes, warmup=1, reps=5)
    if name == "tiny":
        # For tests of the harness: seconds, not timings.
        ns = tokens or (32, 64)
        shapes = tuple(shape_for_tokens(n, 32, 256, dtype=dtype or "float32", mask=mask or "ragged", seq_len=8)
                       for n in ns)
        return Preset(name, shapes, warmup=1, reps=2)
    if name == "core-check":
        return Preset(name, (CORE_TIME_SHAPE, CORE_MEM_SHAPE), losses=("pmd-mean",), warmup=2, reps=7)
    raise ValueError(f"preset must be one of {PRESET_NAMES}, got {name!r}")


# The two measurements of the core issue: time at N=2048, H=512, V=32768 and memory at N=4096, H=1024,
# V=65536, both fp32 with every position trained (N tokens).
CORE_TIME_SHAPE = Shape(16, 128, 512, 32768, "float32", "full", 8)
CORE_MEM_SHAPE = Shape(32, 128, 1024, 65536, "float32", "full", 8)
