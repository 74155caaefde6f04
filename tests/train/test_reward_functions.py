"""Reward functions from the user's code (TRL's convention), their weights and None entries, the errors that name
the function and the prompt, and the signals: frac_reward_zero_std, per-function means, the flat-reward warning."""
import math
import warnings

import pytest
import torch

from fastpmd.train.task.reward_functions import RewardError, RewardFunctions, load_function
from fastpmd.train.task.reward_signals import FlatRewardWatch, fill_dropped, reward_metrics
from fastpmd.train.task.rewards import RewardConfig

USER_FILE = '''
def exact(prompts, completions, answers, difficulty, **kwargs):
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answers)]

def by_difficulty(prompts, completions, answers, difficulty, **kwargs):
    return [None if d is None else float(d) for d in difficulty]

def seen(prompts, completions, answers, **kwargs):
    seen.calls.append(dict(prompts=prompts, completions=completions, answers=answers, **kwargs))
    return [0.5] * len(completions)
seen.calls = []

def boom_on_b(prompts, completions, answers, **kwargs):
    return [1.0 / (c != "b") for c in completions]

def short(prompts, completions, answers, **kwargs):
    return [1.0]

def nan_third(prompts, completions, answers, **kwargs):
    return [float("nan") if i == 2 else 0.0 for i in range(len(completions))]

def text(prompts, completions, answers, **kwargs):
    return ["1"] * len(completions)
'''


@pytest.fixture
def user_file(tmp_path):
    f = tmp_path / "my_reward.py"
    f.write_text(USER_FILE)
    return f


def _fns(user_file, *names, weights=()):
    specs = tuple(f"{user_file}:{n}" for n in names)
    return RewardFunctions(RewardConfig(functions=specs, weights=weights), "dapo")


ARGS = (["p0", "p0", "p1", "p1"], ["3", "b", "4", "x"], ["3", "3", "4", "4"], {"difficulty": [1, 1, None, None]})


def test_user_function_gets_trl_arguments_and_columns(user_file):
    fns = _fns(user_file, "seen")
    scores = fns(*ARGS)
    (call,) = load_function(f"{user_file}:seen").calls
    assert call == {"prompts": ARGS[0], "completions": ARGS[1], "answers": ARGS[2], "difficulty": [1, 1, None, None]}
    assert scores.rewards.tolist() == [0.5] * 4 and scores.names == ["seen"]


def test_weights_and_none_entries(user_file):
    fns = _fns(user_file, "exact", "by_difficulty", weights=(2.0, 0.5))
    s = fns(*ARGS)
    # exact: [1, 0, 1, 0]; by_difficulty: [1, 1, None, None] -> weighted sum ignoring None (TRL's nansum)
    assert s.rewards.tolist() == [2.5, 0.5, 2.0, 0.0]
    only_none = _fns(user_file, "by_difficulty")(*ARGS)
    assert only_none.valid.tolist() == [True, True, False, False]
    assert only_none.rewards[:2].tolist() == [1.0, 1.0] and only_none.rewards[2:].isnan().all()


def test_builtin_by_name_and_default_style():
    s = RewardFunctions(RewardConfig(function="arith", incorrect=0.0), "dapo")(["q"] * 2, ["7\n", "8"], ["7", "7"], {})
    assert s.rewards.tolist() == [1.0, 0.0] and s.names == ["arith"]
    s = RewardFunctions(RewardConfig(), "dapo")(["q"], ["so Answer: 7"], ["7"], {})
    assert s.rewards.tolist() == [1.0] and s.names == ["dapo"]


def test_module_function_spec():
    fn = load_function("fastpmd.train.task.rewards:extract_answer")
    assert fn("Answer: 5") == "5"


@pytest.mark.parametrize("name,match", [
    ("boom_on_b", r"'.*:boom_on_b' raised ZeroDivisionError: .* \(at completion 1, response 1 of prompt 0"),
    ("short", r"'.*:short' returned 1 rewards for 4 completions"),
    ("nan_third", r"'.*:nan_third' returned nan for completion 2, response 0 of prompt 1"),
    ("text", r"'.*:text' returned '1' \(str\) for completion 0"),
])
def test_bad_reward_function_names_function_and_prompt(user_file, name, match):
    fns = _fns(user_file, name)
    with pytest.raises(RewardError, match=match):
        fns(*ARGS, where=lambda i: f"response {i % 2} of prompt {i // 2}")


def test_fill_dropped_and_reward_metrics(user_file):
    s = _fns(user_file, "exact", "by_difficulty")(*ARGS)  # rewards [2, 1, 1, 0]: no group flat
    row = reward_metrics(s, 2, torch.device("cpu"))
    assert row == {"reward_mean": 1.0, "frac_reward_zero_std": 0.0, "rewards/exact/mean": 0.5,
                   "rewards/by_difficulty/mean": 1.0}
    s = _fns(user_file, "by_difficulty")(*ARGS)  # [1, 1, None, None]: group 0 flat, group 1 dropped (flat)
    row = reward_metrics(s, 2, torch.device("cpu"))
    assert row == {"reward_mean": 1.0, "frac_reward_zero_std": 1.0, "rewards/by_difficulty/mean": 1.0,
                   "reward_dropped_frac": 0.5}
    s.rewards[:] = torch.tensor([3.0, math.nan, 1.0, math.nan])
    assert fill_dropped(s, 2).tolist() == [3.0, 3.0, 1.0, 1.0]  # the group's rewarded mean: no shift


def test_flat_reward_warning_after_three_steps():
    watch = FlatRewardWatch(patience=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step, frac in enumerate([1.0, 1.0, 0.5, 1.0, 1.0], 1):
            watch.update(step, frac)
    with pytest.warns(RuntimeWarning, match=r"step 6: every prompt group's rewards have been equal for 3 steps"):
        watch.update(6, 1.0)
