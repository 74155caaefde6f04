"""The task as the trainer sees it: a resumable prompt stream, the encoding of a problem (tokenizer.py) and the
rewards of decoded responses (reward_functions.py). Two tasks: "math" (problem files with the user's keys and
template, the DAPO template and math-verify rewards by default) and "arithmetic" (the offline synthetic task).
"""
from __future__ import annotations

import random

import torch

from ..config import TrainConfig
from .arithmetic import ArithmeticTask
from .data import DAPO_TEMPLATE, PLAIN_TEMPLATE, Problem, format_prompt, load_problems
from .reward_functions import RewardFunctions, Scores
from .rewards import math_reward


class Task:
    """Prompts, templates and rewards of one run. `next_prompts` is deterministic given `state_dict()`."""

    def __init__(self, cfg: TrainConfig, tokenizer, rank: int, world_size: int):
        self.cfg, self.tok, self.rank, self.world = cfg, tokenizer, rank, world_size
        d = cfg.data
        self.seed = cfg.model.seed
        if d.task == "arithmetic":
            self.arithmetic = ArithmeticTask(self.seed, **d.arith_kwargs)
            self.template = self._template(PLAIN_TEMPLATE)
            self.rng = random.Random(f"prompts-{self.seed}")  # one stream for the run; each rank takes its slice
            n_eval = min(d.eval_size, len(self.arithmetic.heldout()))
            self.eval_problems = self.arithmetic.heldout(n_eval) if n_eval else []
            self.encode(self.arithmetic.sample(1, random.Random(0))[0])  # a template the tokenizer cannot encode
            #   fails here, before any model is built
        else:
            self.arithmetic = None
            self.template = self._template(DAPO_TEMPLATE)
            # every rank holds the whole (deduplicated, length-filtered) data set and walks the same shuffled
            # epoch order; each step's prompts are the next P of that order, rank r taking its slice: the data
            # order, and the checkpointed position, do not depend on the world size
            self.problems = self._fit(self._load("data.path"))
            if not self.problems:
                raise ValueError(f"data.path: no problems of at most {d.max_prompt_len} tokens in {d.path!r}")
            self._perm = (-1, None)
            self.position = 0  # index of the step's first prompt in the run's shuffled epoch order (all ranks)
            self.eval_problems = self._fit(self._load("data.eval_path"))[: d.eval_size or None] if d.eval_path else []
        self.reward_functions = RewardFunctions(cfg.reward, self.answer_style)

    def _template(self, default: str) -> str:
        t = self.cfg.data.template
        return default if not t else PLAIN_TEMPLATE if t == "none" else t

    def _load(self, field: str) -> list[Problem]:
        """The problems of data.path or data.eval_path (`field`); ValueError naming the field."""
        d = self.cfg.data
        path = getattr(d, field.split(".")[1])
        try:
            problems = load_problems(path, split=d.split, config=d.config or None, prompt_key=d.prompt_key or None,
                                     answer_key=d.answer_key or None)
        except ValueError as e:
            raise ValueError(f"config {field}: {e}") from None
        clash = {"prompts", "completions", "answers"} & set().union(*(p.columns for p in problems))
        if clash:
            raise ValueError(f"config {field}: the field(s) {sorted(clash)} of {path!r} clash with the reward "
                             "functions' own arguments (prompts, completions, answers); rename them")
        return problems

    def _fit(self, problems: list[Problem]) -> list[Problem]:
        return [p for p in problems if len(self.encode(p)) <= self.cfg.data.max_prompt_len]

    def encode(self, problem: Problem) -> list[int]:
        text = format_prompt(problem, self.template)
        try:
            return self.tok.encode_prompt(text)
        except ValueError as e:  # the char tokenizer: a character of the template or question it does not have
            raise ValueError(f"config model.tokenizer: cannot encode the prompt {text[:80]!r} (data.template "
                             f"{self.cfg.data.template or 'unset'!r}): {e}") from None

    @property
    def answer_style(self) -> str:
        """How answers are read: "arith" (first line, exact match) for the arithmetic task, else reward.style."""
        return "arith" if self.arithmetic is not None else self.cfg.reward.style

    def reward(self, response: str, gold: str) -> float:
        r = self.cfg.reward
        return math_reward(response, gold, style=self.answer_style, correct=r.correct, incorrect=r.incorrect,
                           timeout_s=r.timeout_s)

    def score(self, problems: list[Problem], responses: list[str]) -> Scores:
        """The reward functions on B = len(problems) * n decoded responses (each problem's n in a row)."""
        n = len(responses) // max(len(problems), 1)
        seq = [problems[i // n] for i in range(len(responses))]
        names = sorted({k for p in problems for k in p.columns})
        columns = {k: [p.columns.get(k) for p in seq] for k in names}

        def where(i: int) -> str:
            return f"response {i % n} of prompt {i // n} (problem id {seq[i].id!r})"

        return self.reward_functions([format_prompt(p, self.template) for p in seq], responses,
                                     [p.answer for p in seq], columns, where)

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
