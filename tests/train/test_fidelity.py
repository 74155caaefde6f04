"""The trainer with the released code's options: --estimator for pmd-part (the clamped ploo), a separate
partition tau, the mean-reward tau schedule, and the released code's metrics in metrics.jsonl."""
import math

import pytest

import fastpmd
from fastpmd.train.cli import build_config
from fastpmd.train.trainer import Trainer
from test_e2e import TINY


@pytest.mark.parametrize("extra", [
    ["--loss", "pmd-part", "--estimator", "partition_loo_clamped", "--partition-tau", "0.05"],
    ["--loss", "pmd-mean", "--estimator", "loo", "--tau-schedule", "mean-reward"],
])
def test_released_options_through_the_trainer(tmp_path, world_of_one, extra):
    cfg, _ = build_config(TINY + ["--out", str(tmp_path), "--max-steps", "1", "--no-export", "--no-plots",
                                  "--set", "data.eval_size=0", *extra])
    trainer = Trainer(cfg, world_of_one)
    rows = trainer.fit()
    row = rows[0]
    for k in ("ppo_kl", "seq_ratio_mean", "seq_ratio_min", "seq_ratio_max", "logratio_min_last"):
        assert math.isfinite(row[k]), k
    assert row["seq_ratio_min"] <= row["seq_ratio_mean"] <= row["seq_ratio_max"]
    assert row["logratio_min"] <= row["logratio_min_last"]
    lc = trainer.loss_cfg
    assert lc.advantage_estimator == cfg.loss.estimator
    batch = trainer.last_batch
    n = cfg.rollout.group_size
    if cfg.loss.tau_schedule == "mean-reward":
        assert batch.tau.shape == batch.advantages.shape and (batch.tau > 0).all()
        assert batch.tau.view(-1, n).std(1).max() == 0  # one tau per prompt
    else:
        assert batch.tau is None and lc.partition_tau == 0.05
    assert fastpmd.LossConfig(name="pmd-part", estimator="partition_loo_clamped").advantage_estimator == \
        "partition_loo_clamped"
