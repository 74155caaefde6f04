"""Bring your own task end to end: the docs' example as written, the logged reward_mean equal to what the user's
function returned, a W&B offline run receiving the metrics, dropped completions, the flat-reward warning."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastpmd.train.cli import build_config
from fastpmd.train.trainer import Trainer

from byo_helpers import tiny_model_dir, user_jsonl

DOCS = Path(__file__).resolve().parents[2] / "docs" / "training.md"
SMALL = ["--prompts-per-step", "4", "--group-size", "4", "--mini-batches", "1", "--no-plots", "--no-export"]
OWN = ["--set", "data.prompt_key=input.text", "--set", "data.answer_key=target"]


def _run(argv, cwd, **env):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "fastpmd.train", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


def _rows(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_docs_example_runs(tmp_path):
    """Writes the files of docs/training.md "Training on your own data" and runs its commands as written (plus
    small batch sizes and an output directory in tmp_path)."""
    text = DOCS.read_text()
    section = text.split("## Training on your own data", 1)[1].split("\n## ", 1)[0]
    files = re.findall(r"<!-- file: (\S+) -->\n```\w*\n(.*?)```", section, re.S)
    assert [name for name, _ in files] == ["make_tiny_model.py", "tasks.jsonl", "my_reward.py"]
    for name, body in files:
        (tmp_path / name).write_text(body)
    (commands,) = re.findall(r"```bash\n(.*?)```", section, re.S)
    make, train = commands.replace("\\\n", " ").strip().splitlines()
    assert make == "python make_tiny_model.py"
    subprocess.run([sys.executable, "make_tiny_model.py"], cwd=tmp_path, check=True, timeout=300)
    argv = train.split()
    assert argv[:2] == ["fastpmd", "train"]
    proc = _run(argv[2:] + SMALL + ["--out", "out"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in _rows(tmp_path / "out") if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all({"reward_mean", "frac_reward_zero_std", "rewards/reward/mean"} <= set(r) for r in rows)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model"]["arch"] == "" and cfg["model"]["tokenizer"] == "" and cfg["warmup"]["steps"] == 0
    assert cfg["data"]["task"] == "math"


RECORDING = '''
import json, os

def fn(prompts, completions, answers, difficulty, **columns):
    out = [float(len(c) % 3) + 0.25 * d for c, d in zip(completions, difficulty)]
    with open(os.environ["REWARD_LOG"], "a") as f:
        f.write(json.dumps(out) + "\\n")
    return out
'''


@pytest.mark.slow
def test_logged_reward_is_the_functions_and_wandb_receives_it(tmp_path):
    """The done-when command: --model DIR --data FILE, the user's keys and reward file, nothing else (plus small
    sizes); reward_mean equals the mean of what the function returned; a W&B offline run gets the rows."""
    tiny_model_dir(tmp_path / "tiny")
    user_jsonl(tmp_path / "data.jsonl")
    (tmp_path / "my_reward.py").write_text(RECORDING)
    argv = ["--model", "./tiny", "--data", "data.jsonl", *OWN, "--set", "reward.function=my_reward.py:fn",
            "--max-steps", "2", *SMALL, "--out", "out", "--set", "run.wandb_project=byo-test", "--set",
            "run.wandb_tags=('ci',)"]
    proc = _run(argv, tmp_path, REWARD_LOG=str(tmp_path / "rewards.jsonl"), WANDB_MODE="offline",
                WANDB_SILENT="true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    returned = [json.loads(x) for x in (tmp_path / "rewards.jsonl").read_text().splitlines()]
    rows = [r for r in _rows(tmp_path / "out") if r["kind"] == "train"]
    assert len(returned) == len(rows) == 2 and all(len(v) == 16 for v in returned)
    for r, v in zip(rows, returned):
        assert r["reward_mean"] == pytest.approx(sum(v) / len(v), rel=1e-6)
        assert r["rewards/fn/mean"] == pytest.approx(sum(v) / len(v), rel=1e-6)
        groups = [v[i: i + 4] for i in range(0, 16, 4)]
        assert r["frac_reward_zero_std"] == sum(len(set(g)) == 1 for g in groups) / 4
    (run_dir,) = (tmp_path / "out" / "wandb").glob("offline-run-*")
    (log,) = run_dir.glob("*.wandb")
    data = log.read_bytes()
    for key in (b"train/reward_mean", b"train/frac_reward_zero_std", b"byo-test", b"wandb_project"):
        assert key in data, key  # the rows and the config are in the run's log


def _trainer(tmp_path, d, reward_file: str, *extra):
    tiny_model_dir(tmp_path / "tiny")
    user_jsonl(tmp_path / "data.jsonl")
    (tmp_path / "r.py").write_text(reward_file)
    cfg, _ = build_config(["--model", str(tmp_path / "tiny"), "--data", str(tmp_path / "data.jsonl"), *OWN,
                           "--set", f"reward.function={tmp_path / 'r.py'}:fn", *SMALL, "--no-progress",
                           "--out", str(tmp_path / "out"), *extra])
    return Trainer(cfg, d)


def test_none_rewards_drop_completions_from_the_loss(tmp_path, world_of_one):
    tr = _trainer(tmp_path, world_of_one, "def fn(prompts, completions, answers, **kw):\n"
                  "    return [None if i % 2 else 1.0 + i for i in range(len(completions))]\n", "--max-steps", "1")
    (row,) = tr.fit()
    b = tr.last_batch
    dropped = torch.arange(16) % 2 == 1
    assert not b.loss_mask[dropped].any() and b.loss_mask[~dropped].any(dim=1).all()
    assert (b.advantages[dropped] == 0).all() and (b.advantages[~dropped] != 0).all()
    assert row["reward_dropped_frac"] == 0.5
    assert row["reward_mean"] == pytest.approx(sum(1.0 + i for i in range(0, 16, 2)) / 8)


def test_constant_reward_warns_and_logs_flat_groups(tmp_path, world_of_one):
    tr = _trainer(tmp_path, world_of_one, "def fn(prompts, completions, answers, **kw):\n"
                  "    return [0.0] * len(completions)\n", "--max-steps", "3")
    with pytest.warns(RuntimeWarning, match="step 3: every prompt group's rewards have been equal for 3 steps"):
        rows = tr.fit()
    assert [r["frac_reward_zero_std"] for r in rows] == [1.0, 1.0, 1.0]


@pytest.mark.slow
def test_failing_reward_function_exits_1_naming_it(tmp_path):
    tiny_model_dir(tmp_path / "tiny")
    user_jsonl(tmp_path / "data.jsonl")
    (tmp_path / "bad.py").write_text("def fn(prompts, completions, answers, **kw):\n    return [1.0]\n")
    proc = _run(["--model", "./tiny", "--data", "data.jsonl", *OWN, "--set", "reward.function=bad.py:fn",
                 "--max-steps", "1", *SMALL, "--no-progress", "--out", "out"], tmp_path)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last == ("fastpmd train: error: reward function 'bad.py:fn' returned 1 rewards for 16 completions (one "
                    "per completion, in order; completion 0 is response 0 of prompt 0 (problem id "
                    f"{last.split('problem id ')[1]}"), last


def test_warmup_shows_progress(tmp_path, world_of_one, capsys):
    from fastpmd.train.warmup import supervised_warmup

    cfg, _ = build_config(["--warmup-steps", "3", *SMALL, "--out", str(tmp_path / "out")])
    supervised_warmup(Trainer(cfg, world_of_one))
    err = capsys.readouterr().err
    assert "warm-up: 100%" in err and "3/3" in err, err
