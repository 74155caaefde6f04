"""Reward functions of a run, the built-in answer checks or the user's own, with TRL's convention:

    fn(prompts, completions, answers, **columns) -> list[float | None]

called with keyword arguments once per generation batch (each rank its own responses): ``prompts`` the prompt
texts (template applied, before any chat template), ``completions`` the decoded responses, ``answers`` the gold
answers (one per completion; a prompt's n responses repeat its prompt and answer), ``columns`` every other
field of the data records (lists of the same length; None where a record lacks it). A function named
``"module:function"`` is imported, ``"path/to/file.py:function"`` is loaded from that file; a built-in style
(``dapo``, ``boxed``, ``auto``, ``arith``) is ``rewards.math_reward`` with ``reward.correct``/``incorrect`` and the
per-call ``reward.timeout_s``. A ``None`` entry means "no reward from this function"; a completion that no
function rewards is dropped from the loss. Several functions are summed with ``reward.weights`` (default 1),
ignoring their ``None`` entries, as TRL's ``reward_funcs``/``reward_weights`` do.

A function that raises, returns the wrong number of rewards or a non-number or non-finite reward stops the run
with a ``RewardError`` naming the function and the completion's prompt.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .rewards import STYLES, RewardConfig, math_reward

__all__ = ["RewardError", "Scores", "RewardFunctions", "load_function"]


class RewardError(RuntimeError):
    """A reward function failed during training; the message names the function and the prompt."""


@dataclass
class Scores:
    """One batch's rewards: ``rewards`` [B] float32 (the weighted sum; NaN where no function gave a reward),
    ``per_function`` [B, F] float32 (NaN where that function returned None), ``names`` the F functions' names."""

    rewards: torch.Tensor  # [B]
    per_function: torch.Tensor  # [B, F]
    names: list

    @property
    def valid(self) -> torch.Tensor:  # [B] bool: the completion has a reward (it is trained on)
        return ~self.rewards.isnan()


def load_function(spec: str) -> Callable:
    """The callable named by ``"module:function"`` or ``"path/to/file.py:function"``; ValueError naming the
    spec when the module, the file or the function is missing or the object is not callable."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ValueError(f"{spec!r}: expected 'module:function' or 'path/file.py:function'")
    if where.endswith(".py") or "/" in where:
        path = Path(where).expanduser()
        if not path.is_file():
            raise ValueError(f"{spec!r}: no such file {where!r}")
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        mod_name = f"_fastpmd_reward_{path.stem}_{digest}"  # each file is loaded once per process
        module = sys.modules.get(mod_name)
        if module is None:
            module_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = sys.modules[mod_name] = importlib.util.module_from_spec(module_spec)  # (dataclasses need it)
            try:
                module_spec.loader.exec_module(module)
            except Exception as e:
                del sys.modules[mod_name]
                raise ValueError(f"{spec!r}: loading {where} raised {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:
            raise ValueError(f"{spec!r}: cannot import {where!r}: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"{spec!r}: {where} has no function {name!r}")
    return fn


def builtin(style: str, cfg: RewardConfig) -> Callable:
    """The built-in answer check ``style`` as a TRL-convention reward function."""

    def check(prompts, completions, answers, **columns) -> list[float]:
        return [math_reward(c, a, style=style, correct=cfg.correct, incorrect=cfg.incorrect, timeout_s=cfg.timeout_s)
                for c, a in zip(completions, answers)]

    check.__name__ = style
    return check


class RewardFunctions:
    """The run's reward functions (``reward.function`` / ``reward.functions``, else the built-in
    ``default_style``), weighted. ``__call__`` scores one batch -> Scores."""

    def __init__(self, cfg: RewardConfig, default_style: str):
        specs = cfg.specs() or (default_style,)
        self.specs = list(specs)
        self.fns = []
        for spec in specs:
            try:
                self.fns.append(builtin(spec, cfg) if spec in STYLES else load_function(spec))
            except ValueError as e:
                field = "reward.function" if cfg.function else "reward.functions"
                raise ValueError(f"config {field}: {e}") from None
        self.weights = [float(w) for w in cfg.weights] or [1.0] * len(specs)
        names = [s if s in STYLES else s.rpartition(":")[2] for s in specs]
        self.names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str],
                 columns: dict, where: Callable[[int], str] = str) -> Scores:
        """Score B completions; ``where(i)`` describes completion i in error messages (its prompt)."""
        B = len(completions)
        cols = [[math.nan] * B for _ in self.fns]
        for j, (spec, fn) in enumerate(zip(self.specs, self.fns)):
            kwargs = dict(prompts=list(prompts), completions=list(completions), answers=list(answers), **columns)
            try:
                out = fn(**kwargs)
            except Exception as e:
                raise RewardError(f"reward function {spec!r} raised {type(e).__name__}: {e} "
                                  f"({self._locate(fn, kwargs, B, where)})") from e
            if isinstance(out, torch.Tensor):
                out = out.tolist()
            if inspect.isgenerator(out) or not hasattr(out, "__len__"):
                raise RewardError(f"reward function {spec!r} returned {type(out).__name__}, expected a list of "
                                  f"{B} floats (or None)")
            if len(out) != B:
                raise RewardError(f"reward function {spec!r} returned {len(out)} rewards for {B} completions "
                                  f"(one per completion, in order; completion 0 is {where(0)})")
            for i, v in enumerate(out):
                if v is None:
                    continue
                if not isinstance(v, (int, float)) and not (hasattr(v, "item") and hasattr(v, "dtype")):
                    raise RewardError(f"reward function {spec!r} returned {v!r} ({type(v).__name__}) for completion "
                                      f"{i}, {where(i)}: expected a float or None")
                v = float(v)
                if not math.isfinite(v):
                    raise RewardError(f"reward function {spec!r} returned {v} for completion {i}, {where(i)}: "
                                      "rewards must be finite (None means no reward)")
                cols[j][i] = v
        per = torch.tensor(cols, dtype=torch.float32).T.reshape(B, len(self.fns))  # [B, F]
        w = torch.tensor(self.weights, dtype=torch.float32)
        rewards = (per * w).nansum(1)  # [B]
        rewards[per.isnan().all(1)] = math.nan
        return Scores(rewards, per, self.names)

    @staticmethod
    def _locate(fn, kwargs: dict, B: int, where: Callable[[int], str]) -> str:
        """The first completion on which ``fn`` alone raises too (a failing call is re-run one completion at a
        time, only to name it)."""
        for i in range(B):
            try:
                fn(**{k: v[i : i + 1] for k, v in kwargs.items()})
            except Exception:
                return f"at completion {i}, {where(i)}"
        return "on the whole batch; no single completion reproduces it"
