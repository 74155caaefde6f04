"""What the rewards tell about learning, per RL step: the mean reward of the rewarded completions, the fraction
of prompt groups whose rewards are all equal (``frac_reward_zero_std``: such a group has zero advantage, no
learning signal, as TRL logs it), each reward function's mean and the fraction of completions dropped (no
reward); and a warning when every group stays flat for several steps."""
from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist

from .reward_functions import Scores


def fill_dropped(scores: Scores, group_size: int) -> torch.Tensor:
    """Rewards [B] with each dropped completion's NaN replaced by the mean of its group's rewarded ones (0 when
    none is): it does not move its group's mean. The trainer also zeroes its loss mask and advantage."""
    r = scores.rewards.view(-1, group_size)  # [P, n]
    valid = ~r.isnan()
    mean = torch.where(valid, r, 0.0).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1)
    return torch.where(valid, r, mean).reshape(-1)


def reward_metrics(scores: Scores, group_size: int, device: torch.device) -> dict:
    """reward_mean (rewarded completions), frac_reward_zero_std, rewards/<function>/mean and, when any
    completion is unrewarded, reward_dropped_frac: sums over all ranks (one all-reduce)."""
    r = scores.rewards.view(-1, group_size).double()  # [P, n]
    valid = ~r.isnan()
    filled = torch.where(valid, r, 0.0)
    cnt = valid.sum(1).clamp(min=1)
    mean = filled.sum(1) / cnt
    var = (torch.where(valid, r - mean[:, None], 0.0) ** 2).sum(1) / cnt  # [P]
    flat = torch.isclose(var.sqrt(), torch.zeros_like(var))
    per = scores.per_function.double()  # [B, F]
    per_valid = ~per.isnan()
    sums = torch.cat([torch.stack([filled.sum(), valid.sum().double(), flat.sum().double(),
                                   torch.tensor(float(r.shape[0])), torch.tensor(float(r.numel()))]),
                      torch.where(per_valid, per, 0.0).sum(0), per_valid.sum(0).double()]).to(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    s = sums.tolist()
    F = len(scores.names)
    row = {"reward_mean": s[0] / s[1] if s[1] else math.nan, "frac_reward_zero_std": s[2] / s[3]}
    for f, name in enumerate(scores.names):
        c = s[5 + F + f]
        row[f"rewards/{name}/mean"] = s[5 + f] / c if c else math.nan
    if s[1] < s[4]:
        row["reward_dropped_frac"] = 1.0 - s[1] / s[4]
    return row


class FlatRewardWatch:
    """Warns (RuntimeWarning) once per streak when frac_reward_zero_std stays 1.0 for ``patience`` steps."""

    def __init__(self, patience: int = 3):
        self.patience, self.streak = patience, 0

    def update(self, step: int, frac_zero_std: float) -> None:
        self.streak = self.streak + 1 if frac_zero_std >= 1.0 else 0
        if self.streak == self.patience:
            warnings.warn(f"step {step}: every prompt group's rewards have been equal for {self.patience} steps "
                          "(frac_reward_zero_std = 1.0): the advantages are zero and nothing is learned; check the "
                          "reward function (it may return a constant) or make the task easier/harder",
                          RuntimeWarning, stacklevel=2)
