"""A run killed at any moment resumes from its last checkpoint exactly: same metrics rows (each step once) and the
same final weights as an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

TINY = ["--preset", "tiny-arith", "--prompts-per-step", "8", "--group-size", "4", "--mini-batches", "2",
        "--warmup-steps", "2",
        "--eval-n", "1", "--set", "data.eval_size=4", "--max-new-tokens", "4", "--no-progress", "--no-plots",
        "--eval-every", "2"]
TIMING = ("update_s", "gen_s", "tokens_per_s", "ms_per_token", "gen_ms_per_token", "warmup_s")


def _cmd(out, *extra):
    return [sys.executable, "-m", "fastpmd.train", *TINY, "--out", str(out), *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING and not k.startswith("mem_")} for r in rows]


def _run(cmd):
    proc = subprocess.run(cmd, env=_env(), timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _weights(out):
    return load_file(str(out / "hf" / "model.safetensors"))


@pytest.mark.slow
def test_kill_and_resume_is_exact(tmp_path):
    steps = "6"
    ref = tmp_path / "ref"
    _run(_cmd(ref, "--max-steps", steps, "--save-every", "1"))

    run = tmp_path / "run"
    proc = subprocess.Popen(_cmd(run, "--max-steps", steps, "--save-every", "1"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = run / "checkpoints" / "latest"
    deadline = time.time() + 240
    while not latest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)  # somewhere inside the next step or checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(latest.read_text().strip().split("_")[-1])
    assert 1 <= killed_at < int(steps), "the kill did not interrupt the run"
    with (run / "metrics.jsonl").open("a") as f:  # a row that a killed run may have written past its checkpoint
        f.write(json.dumps({"kind": "train", "step": killed_at + 1, "reward_mean": -1.0}) + "\n")
        f.write('{"kind": "train", "st')  # and a line cut mid-write

    _run(_cmd(run, "--max-steps", steps, "--save-every", "1", "--resume"))
    assert _rows(run) == _rows(ref)
    assert [r["step"] for r in _rows(run) if r["kind"] == "train"] == list(range(1, int(steps) + 1))
    a, b = _weights(ref), _weights(run)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    assert not list((run / "checkpoints").glob("*.tmp"))
    assert len(list((run / "checkpoints").glob("step_*"))) <= 2  # older checkpoints are pruned
