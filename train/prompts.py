"""The task as the trainer sees it: a resumable prompt stream, the encoding of a problem (tokenizer.py) and the
reward of a decoded response. Two tasks: "math" (problem files, DAPO template, math-verify rewards) and
"arithmetic" (the offline synthetic task with its character tokenizer).
"""
from __future__ import annotations

import dataclasses
import random

import torch

from .config import TrainConfig
from .arithmetic import ArithmeticTask
from .data import DAPO_TEMPLATE, PLAIN_TEMPLATE, Problem, format_prompt, load_problems
from .rewards import math_reward, score_batch


class Task:
    """Prompts, templates and rewards of one run. `next_prompts` is deterministic given `state_dict()`."""

    def __init__(self, cfg: TrainConfig, tokenizer, rank: int, world_size: int):
        self.cfg, self.tok, self.rank, self.world = cfg, tokenizer, rank, world_size
        d = cfg.data
        self.seed = cfg.model.seed
        if d.task == "arithmetic":
            self.arithmetic = ArithmeticTask(self.seed, **d.arith_kwargs)
            self.template = PLAIN_TEMPLATE
            self.rng = random.Random(f"prompts-{self.seed}")  # one stream for the run; each rank takes its slice
            n_eval = min(d.eval_size, len(self.arithmetic.heldout()))
            self.eval_problems = self.arithmetic.heldout(n_eval) if n_eval else []
        else:
            self.arithmetic = None
            self.template = DAPO_TEMPLATE
            # every rank holds the whole (deduplicated, length-filtered) data set and walks the same shuffled
            # epoch order; each step's prompts are the next P of that order, rank r taking its slice: the data
            # order, and the checkpointed position, do not depend on the world size
            self.problems = self._fit(load_problems(d.path))
            if not self.problems:
                raise ValueError(f"data.path: no problems of at most {d.max_prompt_len} tokens in {d.path!r}")
            self._perm = (-1, None)
            self.position = 0  # index of the step's first prompt in the run's shuffled epoch order (all ranks)
            self.eval_problems = self._fit(load_problems(d.eval_path))[: d.eval_size or None] if d.eval_path else []

    def _fit(self, problems: list[Problem]) -> list[Problem]:
        return [p for p in problems if len(self.encode(p)) <= self.cfg.data.max_prompt_len]

    def encode(self, problem: Problem) -> list[int]:
        return self.tok.encode_prompt(format_prompt(problem, self.template))

    @property
    def answer_style(self) -> str:
        """How answers are read: "arith" (first line, exact match) for the arithmetic task, else reward.style."""
        return "arith" if self.arithmetic is not None else self.cfg.reward.style

    def reward(self, response: str, gold: str) -> float:
        r = self.cfg.reward
        return math_reward(response, gold, style=self.answer_style, correct=r.correct, incorrect=r.incorrect,
                           timeout_s=r.timeout_s)

    def score(self, responses: list[str], golds: list[str]) -> torch.Tensor:
        """Rewards [B] float32 of decoded responses against their gold answers (rewards.score_batch)."""
        return score_batch(responses, golds, dataclasses.replace(self.cfg.reward, style=self.answer_style))

    def next_prompts(self, n_local: int) -> list[Problem]:
        """This rank's share of the next generation batch: of the next n_local x world prompts of the run's order,
        the rank-th slice of n_local (any world size draws the same prompts in the same order)."""
        lo = self.rank * n_local
        if self.arithmetic is not None:
            return self.arithmetic.sample(n_local * self.world, self.rng)[lo : lo + n_local]
        out, N = [], len(self.problems)
        for g in range(self.position + lo, self.position + lo + n_local):
            epoch, i = divmod(g, N)
            if self._perm[0] != epoch:  # each epoch a fresh shuffle, seeded per (run, epoch)
                gen = torch.Generator().manual_seed(self.seed * 1000 + epoch)
                self._perm = (epoch, torch.randperm(N, generator=gen))
            out.append(self.problems[int(self._perm[1][i])])
        self.position += n_local * self.world
        return out

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()} if self.arithmetic is not None else {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if self.arithmetic is not None:
            self.rng.setstate(state["rng"])
        else:
            self.position = state["position"]
