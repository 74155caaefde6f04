"""Trainer configuration: presets, command-line overrides, and clear errors before any work starts."""
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


def test_paper_recipe_defaults():
    cfg = get_preset("qwen2.5-7b-dapo")
    assert (cfg.rollout.prompts_per_step, cfg.rollout.n, cfg.optim.mini_batches) == (512, 16, 16)
    assert cfg.rollout.temperature == 1.0 and cfg.optim.lr == 1e-6 and cfg.optim.grad_clip == 1.0
    assert (cfg.reward.correct, cfg.reward.incorrect) == (1.0, -1.0)
    assert get_preset("qwen3-30b-a3b-dapo").loss.tau == 0.1


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
    (["--group-size", "1"], "rollout.n"),
    (["--max-steps", "0"], "run.max_steps"),
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
    from fastpmd.train.parallelize import Dist
    from fastpmd.train.trainer import Trainer
    import torch

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_000001\n")
    cfg, _ = build_config(["--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--resume"):
        Trainer(cfg, Dist(0, 1, torch.device("cpu")))


def test_loss_estimator_mismatch_before_work(tmp_path):
    from fastpmd.train.parallelize import Dist
    from fastpmd.train.trainer import Trainer
    import torch

    cfg, _ = build_config(["--out", str(tmp_path), "--set", "loss.estimator='partition'"])
    with pytest.raises(ValueError, match="loss.estimator"):
        Trainer(cfg, Dist(0, 1, torch.device("cpu")))
    assert not any(tmp_path.iterdir())  # nothing written
