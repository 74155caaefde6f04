"""Evaluation metrics: pass@k against brute force, avg@k, maj@k, and evaluate() with a scripted engine."""
import itertools
import math

import numpy as np
import pytest
import torch

from fastpmd.train.task.arithmetic import ArithmeticTask
from fastpmd.train.task.data import Problem
from fastpmd.train.task.tokenizer import CharTokenizer
from fastpmd.train.task.evaluation import avg_at_k, evaluate, maj_at_k, majority_answer, pass_at_k
from fastpmd.train.task.rewards import math_reward
from fastpmd.train.rollout import SamplingConfig


def arith_reward(response: str, gold: str) -> float:
    return math_reward(response, gold, style="arith", correct=1.0, incorrect=0.0)


def _brute_pass_at_k(n, c, k):
    """Fraction of k-subsets of n samples (c correct) that hold at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pass_at_k_matches_enumeration_and_closed_form(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            got = pass_at_k(n, c, k)
            assert got == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12)
            assert got == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_edges_and_large_n():
    assert pass_at_k(10, 0, 3) == 0.0
    assert pass_at_k(10, 10, 3) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # large n: stays finite and agrees with exact rational arithmetic
    exact = 1 - math.comb(1000 - 7, 64) / math.comb(1000, 64)
    assert pass_at_k(1000, 7, 64) == pytest.approx(exact, rel=1e-12)
    with pytest.raises(ValueError, match="k must be"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="c must be"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="k must be"):
        pass_at_k(4, 1, 0)
    with pytest.raises(ValueError, match="n must be"):
        pass_at_k(0, 0, 1)
    with pytest.raises(ValueError, match="k must be an int"):
        pass_at_k(4, 1, 1.5)


def test_avg_at_k():
    assert avg_at_k([[1, 0, 0, 1], [1, 1, 1, 1]]) == pytest.approx(0.75)
    assert avg_at_k(torch.tensor([[True, False]])) == 0.5
    assert avg_at_k(np.zeros((3, 2), dtype=bool)) == 0.0
    with pytest.raises(ValueError, match="correct"):
        avg_at_k([1, 0])


def test_majority_answer_ties_and_none():
    assert majority_answer(["3", "5", "5", "3"]) == "3"  # tie -> first to appear
    assert majority_answer(["5", "3", "3", "5"]) == "5"
    assert majority_answer([None, None, "4"]) == "4"  # no-answer samples do not vote
    assert majority_answer([None, None]) is None
    assert majority_answer(["1,000", "7", "1000"]) == "1,000"  # normalised text votes together


def test_maj_at_k():
    answers = [["1", "2", "2"], ["\\frac{1}{2}", "0.5", "9"], [None, None, None], ["4", "4", "7"]]
    golds = ["2", "0.5", "1", "7"]
    # problem 2: "\frac{1}{2}" and "0.5" vote apart (text), tie -> "\frac{1}{2}", which equals 0.5 (math_verify)
    assert maj_at_k(answers, golds) == pytest.approx(2 / 4)
    exact = maj_at_k(answers, golds, check=lambda a, g: a == g)
    assert exact == pytest.approx(1 / 4)
    with pytest.raises(ValueError, match="same length"):
        maj_at_k(answers, golds[:2])


class ScriptedEngine:
    """Returns fixed token responses per prompt text (a stand-in engine for the metric plumbing)."""

    def __init__(self, tok, table):
        self.tok, self.table, self.calls = tok, table, []

    def generate(self, prompt_ids, sampling):
        self.calls.append(sampling)
        out = []
        for p in prompt_ids:
            texts = self.table[self.tok.decode(p)][: sampling.n]
            out.append([self.tok.encode(t, add_eos=True) for t in texts])
        return out

    def update_weights(self, named_tensors):
        pass

    def sleep(self):
        pass

    def wake(self):
        pass


def test_evaluate_arithmetic_with_scripted_engine():
    tok = CharTokenizer()
    probs = [Problem("1+2=", "3", "a"), Problem("5+5=", "10", "b"), Problem("9+0=", "9", "c")]
    table = {"1+2=": ["3", "4", "3", "3"], "5+5=": ["1", "10", "2", "3"], "9+0=": ["0", "1", "2", "3"]}
    eng = ScriptedEngine(tok, table)
    res = evaluate(eng, probs, k=4, sampling=SamplingConfig(n=1, max_new_tokens=8), reward_fn=arith_reward,
                   encode=tok.encode, decode=tok.decode, answer_style="arith", batch_size=2)
    assert [s.n for s in eng.calls] == [4, 4]  # n replaced by k; two batches
    assert res["avg@4"] == pytest.approx((3 / 4 + 1 / 4 + 0) / 3)
    assert res["pass@1"] == pytest.approx(res["avg@4"])
    assert res["pass@2"] == pytest.approx((pass_at_k(4, 3, 2) + pass_at_k(4, 1, 2)) / 3)
    assert res["pass@4"] == pytest.approx(2 / 3)
    assert res["maj@4"] == pytest.approx(1 / 3)  # "3" wins problem a; problem b is a 4-way tie -> "1"
    assert res["num_problems"] == 3
    assert res["mean_response_tokens"] == pytest.approx(np.mean([2, 2, 2, 2, 2, 3, 2, 2, 2, 2, 2, 2]))


def test_evaluate_math_rewards_and_pass_keys():
    tok = CharTokenizer(CharTokenizer.DEFAULT_CHARS + "Answer:")
    probs = [Problem("2*3=", "6", "a")]
    eng = ScriptedEngine(tok, {"2*3=": ["Answer: 6", "Answer: 5", "Answer: 6"]})
    res = evaluate(eng, probs, k=3, sampling=SamplingConfig(), reward_fn=math_reward,
                   encode=tok.encode, decode=tok.decode)
    assert set(res) == {"avg@3", "pass@1", "pass@2", "pass@3", "maj@3", "num_problems", "mean_response_tokens"}
    assert res["avg@3"] == pytest.approx(2 / 3) and res["maj@3"] == 1.0
    with pytest.raises(ValueError, match="k must be"):
        evaluate(eng, probs, k=0, sampling=SamplingConfig(), reward_fn=math_reward, encode=tok.encode,
                 decode=tok.decode)


def test_heldout_problems_evaluate_end_to_end_with_oracle():
    # an engine that always answers correctly scores 1 everywhere
    tok = CharTokenizer()
    task = ArithmeticTask(seed=0, max_operand=9)
    held = task.heldout(5)
    eng = ScriptedEngine(tok, {p.prompt: [p.answer] * 2 for p in held})
    res = evaluate(eng, held, k=2, sampling=SamplingConfig(), reward_fn=arith_reward, encode=tok.encode,
                   decode=tok.decode, answer_style="arith")
    assert res["avg@2"] == res["pass@2"] == res["maj@2"] == 1.0
