"""Trainer configuration: presets, command-line overrides, and clear errors before any work starts."""
import dataclasses
import json

import pytest

from fastpmd.train.cli import build_config, main
from fastpmd.train.config import validate
from fastpmd.train.presets import PRESETS, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate(name):
    cfg = get_preset(name)
    validate(cfg)
    assert cfg.loss.name == "pmd-mean"


@pytest.mark.parametrize("name", ["qwen2.5-7b-dapo", "qwen3-30b-a3b-dapo"])
def test_presets_follow_the_released_scripts(name):
    # OpenKimi examples/math/run_pmd_dapo17k_{qwen25-7b,qwen3-30b-a3b}.sh
    cfg = get_preset(name)
    assert (cfg.rollout.prompts_per_step, cfg.rollout.group_size, cfg.optim.mini_batches) == (512, 16, 16)  # mini-batch 32
    assert cfg.rollout.prompts_per_step // cfg.optim.mini_batches == 32
    assert cfg.rollout.temperature == 1.0 and cfg.rollout.top_p == 1.0 and cfg.rollout.max_new_tokens == 8192
    assert (cfg.rollout.eval_n, cfg.rollout.eval_temperature, cfg.rollout.eval_top_p) == (32, 1.0, 0.7)
    assert cfg.optim.lr == 1e-6 and cfg.optim.grad_clip == 1.0 and cfg.data.max_prompt_len == 2048
    assert (cfg.reward.correct, cfg.reward.incorrect) == (1.0, -1.0)
    lo = cfg.loss
    assert (lo.name, lo.tau, lo.estimator, lo.length_norm) == ("pmd-mean", 0.01, "loo", True)  # rloo, pmd_tau 0.01
    assert lo.partition_tau is None and lo.tau_schedule == "none"  # partition_tau = pmd_tau = 0.01
    assert cfg.data.path == "hf:fengyao1909/dapo-math-17k-deduplicated"
    assert (cfg.run.max_steps, cfg.run.eval_every, cfg.run.save_every) == (510, 5, 100)
    from fastpmd.train.trainer import loss_config
    assert loss_config(cfg).advantage_estimator == "loo"


def test_estimator_honoured_for_every_loss():
    from fastpmd.train.trainer import loss_config
    for loss, est in [("pmd-part", "partition_loo"), ("pmd-part", "partition_loo_clamped"), ("grpo", "loo"),
                      ("gspo", "mean"), ("pg", "mean"), ("pmd-mean", "loo")]:
        cfg, _ = build_config(["--loss", loss, "--estimator", est, "--partition-tau", "0.05"])
        validate(cfg)
        lc = loss_config(cfg)
        assert lc.advantage_estimator == est and lc.partition_tau == 0.05
    cfg, _ = build_config(["--loss", "grpo"])  # tiny-arith: estimator None = the loss's own default
    assert loss_config(cfg).advantage_estimator == "grpo"
    for loss, est in [("grpo", "partition"), ("pmd-mean", "partition_loo_clamped"), ("pmd-part", "loo")]:
        with pytest.raises(ValueError, match="loss.estimator"):  # the LossConfig is rebuilt with both at once
            build_config(["--loss", loss, "--estimator", est])
        assert main(["--loss", loss, "--estimator", est, "--print-config"]) == 2


def test_overrides():
    cfg, _ = build_config(["--preset", "tiny-arith", "--loss", "grpo", "--tau", "0.05", "--max-steps", "3",
                           "--out", "/tmp/x", "--save-every", "2", "--resume", "--set", "optim.weight_decay=0.1",
                           "--set", "model.arch_kwargs={'hidden_size': 32}"])
    assert cfg.loss.name == "grpo" and cfg.loss.tau == 0.05 and cfg.run.max_steps == 3
    assert cfg.run.out == "/tmp/x" and cfg.run.save_every == 2 and cfg.run.resume
    assert cfg.optim.weight_decay == 0.1 and cfg.model.arch_kwargs == {"hidden_size": 32}


def test_print_config(capsys):
    assert main(["--preset", "tiny-arith", "--lr", "0.01", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["optim"]["lr"] == 0.01


@pytest.mark.parametrize("argv, field", [
    (["--loss", "ppo"], "loss.name"),
    (["--tau", "0"], "loss.tau"),
    (["--estimator", "median"], "loss.estimator"),
    (["--partition-tau", "0"], "loss.partition_tau"),
    (["--tau-schedule", "cosine"], "loss.tau_schedule"),
    (["--tau-schedule", "mean-reward", "--set", "reward.correct=0.0"], "loss.tau_schedule"),
    (["--group-size", "1"], "rollout.group_size"),
    (["--max-steps", "-1"], "run.max_steps"),
    (["--lr", "-1"], "optim.lr"),
    (["--prompts-per-step", "31"], "optim.mini_batches"),  # 31 prompts do not split into 2 mini-batches
    (["--device", "tpu"], "run.device"),
    (["--set", "optim.nope=1"], "optim.nope"),
    (["--set", "optim.lr"], "SECTION.FIELD=VALUE"),
    (["--preset", "gpt-5"], "gpt-5"),
    (["--set", "data.task='math'"], "data.path"),
])
def test_bad_config_is_a_clear_error(argv, field, capsys):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        cfg, _ = build_config(argv + ["--out", "/nonexistent/never-created"])
        validate(cfg)
    assert main(argv + ["--out", "/nonexistent/never-created"]) == 2  # the command: a message, exit status 2
    assert field in capsys.readouterr().err


def test_world_size_must_split_prompts():
    cfg = get_preset("tiny-arith")
    with pytest.raises(ValueError, match="rollout.prompts_per_step"):
        validate(cfg, world_size=3)


def test_existing_run_needs_resume(tmp_path):
    from fastpmd.train.distributed import Dist
    from fastpmd.train.trainer import Trainer
    import torch

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_000001\n")
    cfg, _ = build_config(["--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--resume"):
        Trainer(cfg, Dist(0, 1, torch.device("cpu")))


def test_loss_estimator_mismatch_before_work(tmp_path):

    with pytest.raises(ValueError, match="loss.estimator"):  # refused while the config is built
        build_config(["--out", str(tmp_path), "--set", "loss.estimator='partition'"])
    cfg, _ = build_config(["--out", str(tmp_path)])
    with pytest.raises(ValueError, match="estimator"):  # and by the Trainer, for a config built in code
        cfg.loss = dataclasses.replace(cfg.loss, estimator="partition")
    assert not any(tmp_path.iterdir())  # nothing written
