"""Answer extraction and math rewards on tricky answers."""
import threading
import time

import pytest
import torch

from fastpmd.train.task.rewards import (
    _HELPER,
    RewardConfig,
    extract_answer,
    is_equivalent,
    last_boxed,
    math_reward,
    normalize_answer,
    score_batch,
)


@pytest.mark.parametrize(
    "text, style, expected",
    [
        ("so we get 5.\nAnswer: 42", "dapo", "42"),
        ("Answer: 1\nwait, no.\nAnswer: $\\frac{1}{2}$.", "dapo", "\\frac{1}{2}"),  # last match wins
        ("answer:   -3  ", "dapo", "-3"),  # case-insensitive, stripped
        ("Answer: 1,000", "dapo", "1,000"),
        ("Answer: \\boxed{12}", "dapo", "12"),
        ("Answer: \\(x^2\\)", "dapo", "x^2"),
        ("The result is \\boxed{\\frac{a}{b}} and \\boxed{\\sqrt{2}}.", "boxed", "\\sqrt{2}"),
        ("nested \\boxed{\\frac{1}{\\sqrt{3}}}", "boxed", "\\frac{1}{\\sqrt{3}}"),
        ("\\boxed 7 is it", "boxed", "7"),
        ("\\fbox{9}", "boxed", "9"),
        ("unbalanced \\boxed{12", "boxed", None),
        ("The final answer is \\boxed{5}", "dapo", None),  # dapo only looks for "Answer:"
        ("The final answer is \\boxed{5}", "auto", "5"),
        ("Answer: 8\n then \\boxed{5}", "auto", "8"),  # dapo first
        ("no answer here", "auto", None),
        ("Answer:   \n", "dapo", None),
        ("", "auto", None),
        ("19\n3+4=7", "arith", "19"),
    ],
)
def test_extract_answer(text, style, expected):
    assert extract_answer(text, style) == expected


def test_dapo_searches_only_last_300_characters():
    text = "Answer: 7\n" + "x" * 400
    assert extract_answer(text, "dapo") is None
    assert extract_answer("y" * 400 + "\nAnswer: 7", "dapo") == "7"


def test_last_boxed_none_without_box():
    assert last_boxed("nothing") is None


def test_bad_style_raises():
    with pytest.raises(ValueError, match="style"):
        extract_answer("Answer: 1", "latex")
    with pytest.raises(ValueError, match="style"):
        RewardConfig(style="nope")


@pytest.mark.parametrize(
    "a, b",
    [("1,000", "1000"), ("\\dfrac{1}{2}", "\\frac{1}{2}"), ("x = 5", "5"), ("3.00", "3"), ("+4", "4"),
     ("\\left(1,2\\right)", "(1,2)"), ("$7$", "7")],
)
def test_normalize_answer(a, b):
    assert normalize_answer(a) == normalize_answer(b)


def test_normalize_keeps_different_answers_apart():
    assert normalize_answer("12") != normalize_answer("1,2")  # not a thousands grouping
    assert normalize_answer("-3") != normalize_answer("3")


@pytest.mark.parametrize(
    "response, gold",
    [
        ("Answer: 0.5", "\\frac{1}{2}"),
        ("Answer: 1/2", "\\frac{1}{2}"),
        ("Answer: \\frac{1}{2}", "0.5"),
        ("Answer: $\\dfrac{3}{4}$.", "3/4"),
        ("Answer: -7", "-7"),
        ("Answer: 1,000", "1000"),
        ("Answer: 12,345", "12345"),
        ("Answer: 2\\sqrt{3}", "\\sqrt{12}"),
        ("Answer: \\pi/2", "\\frac{\\pi}{2}"),
        ("Answer: 10^{3}", "1000"),
        ("Answer: x=5", "5"),
        ("Answer: 25", "025"),  # AIME answers may be written with leading zeros
    ],
)
def test_math_reward_correct(response, gold):
    assert math_reward(response, gold) == 1.0


@pytest.mark.parametrize(
    "response, gold",
    [
        ("Answer: -7", "7"),
        ("Answer: 0.51", "\\frac{1}{2}"),
        ("Answer: 2", "\\sqrt{3}"),
        ("Answer: garbage words here", "12"),
        ("I do not know", "12"),  # no answer
        ("Answer: }}}{{{\\frac", "3"),  # unparsable
        ("Answer: 1,2", "12"),
        ("", "3"),
    ],
)
def test_math_reward_incorrect(response, gold):
    assert math_reward(response, gold) == -1.0


def test_math_reward_custom_values_and_boxed_style():
    assert math_reward("so \\boxed{4}", "4", style="boxed", correct=2.0, incorrect=0.0) == 2.0
    assert math_reward("so \\boxed{4}", "5", style="boxed", correct=2.0, incorrect=0.0) == 0.0
    assert math_reward("so \\boxed{4}", "4", style="dapo") == -1.0  # no "Answer:"


def test_math_reward_validates_arguments():
    with pytest.raises(ValueError, match="gold"):
        math_reward("Answer: 1", 1)
    with pytest.raises(ValueError, match="timeout_s"):
        math_reward("Answer: 1", "1", timeout_s=0)


HUGE = "(10^{10^{10}})!"  # sympy would evaluate this for ever without a time-out


def test_time_out_counts_as_incorrect_in_the_main_thread():
    t0 = time.monotonic()
    assert math_reward(f"Answer: {HUGE}", "7", timeout_s=1.0) == -1.0
    assert time.monotonic() - t0 < 60


def test_is_equivalent_off_the_main_thread_uses_the_helper_process():
    # signal-based time-outs only work in a main thread: off it, checks go to a helper process
    result = {}

    def run():
        result["eq"] = is_equivalent("0.5", "\\frac{1}{2}")
        result["ne"] = is_equivalent("0.6", "\\frac{1}{2}")
        t0 = time.monotonic()
        result["huge"] = math_reward(f"Answer: {HUGE}", "7", timeout_s=1.0)
        result["fast"] = time.monotonic() - t0 < 60

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=240)
    assert result == {"eq": True, "ne": False, "huge": -1.0, "fast": True}
    # a stopped (or killed) helper is restarted by the next check
    _HELPER.stop()
    t = threading.Thread(target=lambda: result.update(again=is_equivalent("1/2", "0.5")))
    t.start()
    t.join(timeout=240)
    assert result["again"] is True


def test_overlong_answer_is_exact_match_only():
    long = "1+" * 400 + "1"
    assert not is_equivalent(long, "401")
    assert is_equivalent(long, long)


def test_score_batch():
    cfg = RewardConfig()
    r = score_batch(["Answer: 3", "Answer: 4", "none"], ["3", "3", "3"], cfg)
    assert r.dtype == torch.float32 and r.shape == (3,)
    assert r.tolist() == [1.0, -1.0, -1.0]
    arith = score_batch(["19\n", " 19", "190"], ["19"] * 3, RewardConfig(style="arith", incorrect=0.0))
    assert arith.tolist() == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="same length"):
        score_batch(["a"], [], cfg)
