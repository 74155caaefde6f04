"""Evaluation metrics: avg@k, unbiased pass@k, maj@k, and ``evaluate`` over a rollout engine.

- avg@k: mean over problems of the fraction of the k samples that are correct.
- pass@j (j <= k): mean over problems of the unbiased estimate 1 - C(k-c, j)/C(k, j) from the k samples
  (c correct), computed as the product 1 - prod_{i=k-c+1}^{k} (1 - j/i) (no large binomials).
- maj@k: the most frequent extracted answer among the k samples (normalised text; ties go to the answer that
  appears first) is correct. Samples without an answer do not vote; no answer at all counts as wrong.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Callable, Sequence

import numpy as np
import torch

from fastpmd.train.task.data import PLAIN_TEMPLATE, Problem, format_prompt
from fastpmd.train.task.rewards import extract_answer, is_equivalent, normalize_answer
from fastpmd.train.rollout.base import RolloutEngine, SamplingConfig

__all__ = ["avg_at_k", "pass_at_k", "maj_at_k", "majority_answer", "evaluate"]


def _as_bool_matrix(correct) -> np.ndarray:
    arr = correct.detach().cpu().numpy() if isinstance(correct, torch.Tensor) else np.asarray(correct)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"correct must be a non-empty [P, k] matrix, got shape {arr.shape}")
    return arr.astype(bool)


def avg_at_k(correct) -> float:
    """Mean accuracy of a ``[P, k]`` boolean matrix (tensor, array or nested lists)."""
    return float(_as_bool_matrix(correct).mean())


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k), in product form."""
    for name, v in (("n", n), ("c", c), ("k", k)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            raise ValueError(f"{name} must be an int, got {v!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    if n - c < k:
        return 1.0
    # C(n-c, k)/C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i)
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def majority_answer(answers: Sequence[str | None]) -> str | None:
    """The most frequent non-None answer by normalised text (ties: first to appear), returned as first seen."""
    keys = [normalize_answer(a) if a is not None else None for a in answers]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None
    best = max(counts.values())
    for a, k in zip(answers, keys):  # first appearance among the most frequent
        if k is not None and counts[k] == best:
            return a
    raise AssertionError("unreachable")


def maj_at_k(answers: Sequence[Sequence[str | None]], golds: Sequence[str], *,
             check: Callable[[str, str], bool] | None = None) -> float:
    """Fraction of problems whose majority-voted answer is correct.

    ``answers``: ``[P][k]`` extracted answers (None for none); ``check(answer, gold)`` decides correctness
    (default: ``rewards.is_equivalent``, normalised match then math_verify).
    """
    if len(answers) != len(golds) or len(answers) == 0:
        raise ValueError(f"answers and golds must be non-empty and the same length, got "
                         f"{len(answers)} and {len(golds)}")
    check = check or (lambda a, g: is_equivalent(a, g))
    hits = 0
    for row, gold in zip(answers, golds):
        voted = majority_answer(row)
        hits += voted is not None and bool(check(voted, gold))
    return hits / len(answers)


def evaluate(
    engine: RolloutEngine,
    problems: Sequence[Problem],
    *,
    k: int,
    sampling: SamplingConfig,
    reward_fn: Callable[[str, str], float],
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    template: str = PLAIN_TEMPLATE,
    answer_style: str = "auto",
    threshold: float = 0.0,
    batch_size: int = 64,
    rank: int = 0,
    world_size: int = 1,
    gather: Callable[[list], list[list]] | None = None,
) -> dict[str, float]:
    """Sample k responses per problem and score them, optionally sharded over ranks.

    ``reward_fn(response_text, gold)``; a sample is correct when its reward is > ``threshold``. Prompts are
    ``encode(format_prompt(problem, template))``; responses are ``decode(ids)`` (strip special tokens there).
    ``sampling.n`` is replaced by k. ``answer_style`` is the ``extract_answer`` style used for maj@k
    ("arith" for the synthetic task: the voted answer must equal the gold exactly; otherwise voted answers are
    checked with ``rewards.is_equivalent``). Returns ``avg@k``, ``pass@j`` for j = 1, 2, 4, ... <= k (and k),
    ``maj@k``, ``num_problems`` and ``mean_response_tokens``.

    Problems go to the engine in chunks of ``batch_size``; chunk c is sampled with seed ``sampling.seed + c``
    (None stays None). With ``world_size`` > 1, rank ``rank`` samples chunks rank, rank + W, ... only and
    ``gather(rows)`` (every rank's list of rows, e.g. built on ``torch.distributed.all_gather_object``) joins
    them: the result does not depend on the world size, and every rank returns it.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not problems:
        raise ValueError("problems must not be empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if world_size > 1 and gather is None:
        raise ValueError("gather: needed to join the ranks' results when world_size > 1")
    rows = []  # (problem index, correct [k], answers [k], lengths [k]) of this rank's chunks
    for c, s in enumerate(range(0, len(problems), batch_size)):
        if c % world_size != rank:
            continue
        chunk = problems[s : s + batch_size]
        prompt_ids = [encode(format_prompt(p, template)) for p in chunk]
        seed = None if sampling.seed is None else sampling.seed + c
        outs = engine.generate(prompt_ids, dataclasses.replace(sampling, n=k, seed=seed))  # [P_chunk][k][T_i]
        if len(outs) != len(chunk) or any(len(o) != k for o in outs):
            raise RuntimeError("engine.generate returned the wrong number of responses")
        for i, (prob, resp) in enumerate(zip(chunk, outs)):
            texts = [decode(ids) for ids in resp]
            rows.append((s + i, [bool(reward_fn(t, prob.answer) > threshold) for t in texts],
                         [extract_answer(t, answer_style) for t in texts], [len(ids) for ids in resp]))
    if world_size > 1:
        rows = [r for part in gather(rows) for r in part]
    rows.sort(key=lambda r: r[0])
    if [r[0] for r in rows] != list(range(len(problems))):
        raise RuntimeError("evaluate: the gathered rows do not cover every problem exactly once")
    correct = np.array([r[1] for r in rows], dtype=bool)  # [P, k]
    answers: list[list[str | None]] = [r[2] for r in rows]
    lengths = [n for r in rows for n in r[3]]
    result: dict[str, float] = {f"avg@{k}": avg_at_k(correct)}
    c = correct.sum(axis=1)
    js = sorted({2**e for e in range(k.bit_length()) if 2**e <= k} | {k})
    for j in js:
        result[f"pass@{j}"] = float(np.mean([pass_at_k(k, int(ci), j) for ci in c]))
    exact = (lambda a, g: a.strip() == g.strip()) if answer_style == "arith" else None
    result[f"maj@{k}"] = maj_at_k(answers, [p.answer for p in problems], check=exact)
    result["num_problems"] = float(len(problems))
    result["mean_response_tokens"] = float(np.mean(lengths))
    return result
