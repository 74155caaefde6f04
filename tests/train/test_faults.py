"""Faults of a training run: SIGTERM/SIGINT save the last completed step and resume loses nothing; corrupted
checkpoints are detected (manifest of sizes and sha256) and skipped for the newest one that loads; a
non-finite loss input or parameter is an error naming the step; --resume without a checkpoint says so."""
import json
import shutil
import signal
import subprocess
import time

import pytest
import torch

from test_resume import _cmd, _env, _rows, _weights


def _run(cmd, expect=0):
    proc = subprocess.run(cmd, env=_env(), timeout=300, capture_output=True, text=True)
    assert proc.returncode == expect, proc.stderr[-4000:]
    return proc


def _same_final_state(a, b, drop_eval_at=None):
    rows_b = [r for r in _rows(b) if not (r["kind"] == "eval" and r["step"] == drop_eval_at)]
    assert _rows(a) == rows_b
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=0, msg=k)


def _train_steps(out):
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return [r["step"] for r in rows if r.get("kind") == "train"]


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_the_last_step_and_resume_loses_nothing(tmp_path, sig, code):
    steps = "40"  # long enough that the signal lands mid-run
    ref = tmp_path / "ref"
    _run(_cmd(ref, "--max-steps", steps, "--save-every", "1000"))

    run = tmp_path / "run"
    proc = subprocess.Popen(_cmd(run, "--max-steps", steps, "--save-every", "1000"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while len(_train_steps(run)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == code, err[-3000:]
    done = _train_steps(run)
    stopped_at = done[-1]
    assert 2 <= stopped_at < int(steps), "the signal did not interrupt the run"
    assert done == list(range(1, stopped_at + 1))
    assert f"stopped by {signal.Signals(sig).name} after step {stopped_at}" in err
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{stopped_at:06d}"  # save_every 1000: this checkpoint exists only because of the signal
    assert not (run / "hf").exists()  # no export of an unfinished run

    _run(_cmd(run, "--max-steps", steps, "--save-every", "1000", "--resume"))
    _same_final_state(ref, run)


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A 3-step run with checkpoints at steps 2 and 3 (kept), and the 4-step reference run."""
    base = tmp_path_factory.mktemp("ckpt")
    _run(_cmd(base / "src", "--max-steps", "3", "--save-every", "1"))
    _run(_cmd(base / "ref", "--max-steps", "4", "--save-every", "1"))
    return base


def _flip(path, n=64):
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    for i in range(start, start + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CORRUPTIONS = {  # name -> (edit of OUT/checkpoints, the checkpoint the resume must use, text of the warning)
    "flipped-distcp": (lambda c: _flip(next((c / "step_000003").glob("*.distcp"))), 2, "checksum mismatch"),
    "truncated-distcp": (lambda c: _truncate(next((c / "step_000003").glob("*.distcp"))), 2, "truncated"),
    "missing-metadata": (lambda c: (c / "step_000003" / ".metadata").unlink(), 2, "missing .metadata"),
    "missing-rank-file": (lambda c: (c / "step_000003" / "rank0.pt").unlink(), 2, "missing rank0.pt"),
    "flipped-rank-file": (lambda c: _flip(c / "step_000003" / "rank0.pt", 16), 2, "checksum mismatch in rank0.pt"),
    "garbage-manifest": (lambda c: (c / "step_000003" / "manifest.json").write_text("{oops"), 2, "manifest"),
    "garbage-latest": (lambda c: (c / "latest").write_bytes(b"\x00\xffnot a step\n"), 3, "latest"),
    "latest-to-missing": (lambda c: (c / "latest").write_text("step_000099\n"), 3, "step_000099"),
    "no-manifest-flipped": (lambda c: ((c / "step_000003" / "manifest.json").unlink(),
                                       _flip(next((c / "step_000003").glob("*.distcp")))), 2, "no manifest.json"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupted_checkpoint_falls_back(two_checkpoints, tmp_path, name):
    edit, used, warning = CORRUPTIONS[name]
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints / "src", run)
    edit(run / "checkpoints")
    proc = _run(_cmd(run, "--max-steps", "4", "--save-every", "1", "--resume"))
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("fastpmd train: warning:")]
    assert any(warning in w for w in warnings), proc.stderr[-3000:]
    if used == 2:
        assert any("skipped checkpoint" in w and "step_000003" in w for w in warnings), warnings
    train_steps = _train_steps(run)
    assert train_steps == [1, 2, 3, 4]  # rows after the checkpoint used were dropped and redone once
    # resumed from step 3, the run keeps the source run's final eval at step 3 (its last step), which the
    # 4-step reference (evals every 2 steps) does not have
    _same_final_state(two_checkpoints / "ref", run, drop_eval_at=3 if used == 3 else None)


@pytest.mark.slow
def test_no_loadable_checkpoint_is_an_error(two_checkpoints, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints / "src", run)
    for d in (run / "checkpoints").glob("step_*"):
        (d / ".metadata").unlink()
    proc = _run(_cmd(run, "--max-steps", "4", "--resume"), expect=2)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fastpmd train: error: run.resume: no checkpoint") and "step_000002" in last


@pytest.mark.slow
def test_resume_without_checkpoint_warns_and_starts_fresh(tmp_path):
    proc = _run(_cmd(tmp_path / "run", "--max-steps", "1", "--resume"))
    assert "warning: --resume: no checkpoint" in proc.stderr and "starting a fresh run" in proc.stderr
    assert _train_steps(tmp_path / "run") == [1]


@pytest.mark.slow
def test_non_finite_is_an_error_naming_the_step(tmp_path):
    # lr 1e30 is finite (so the config accepts it) but the first update blows the weights up: the second
    # mini-batch of step 1 sees inf hidden states. Rewards must vary for a gradient: small operands, 100 warm-up steps.
    out = tmp_path / "run"
    proc = _run(_cmd(out, "--max-steps", "3", "--lr", "1e30", "--warmup-steps", "100",
                     "--set", "data.arith_kwargs={'max_operand': 3}"), expect=1)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fastpmd train: error: step 1:") and ("non-finite" in last or "NaN" in last), last
    assert _train_steps(out) == []  # nothing non-finite was logged


def test_manifest_detects_flipped_bytes(tmp_path):
    from fastpmd.train import checkpoint

    d = tmp_path / "step_000001"
    d.mkdir()
    (d / ".metadata").write_bytes(b"m" * 100)
    (d / "__0_0.distcp").write_bytes(bytes(range(256)) * 64)
    (d / "rank0.pt").write_bytes(b"r" * 10)
    checkpoint.write_manifest(d)
    assert checkpoint.verify(d) == (None, None)
    _flip(d / "__0_0.distcp")
    problem, _ = checkpoint.verify(d)
    assert problem == "checksum mismatch in __0_0.distcp (corrupted)"
    (d / "manifest.json").unlink()
    problem, _ = checkpoint.verify(d)  # incomplete, or written before manifests: not loaded unless asked for
    assert problem.startswith("no manifest.json")
    problem, note = checkpoint.verify(d, unverified_ok=True)
    assert problem is None and "without verification" in note


def test_row_and_parameter_checks():
    import fastpmd
    from fastpmd.train import faults

    lp = torch.zeros(1, 2)
    lin = torch.nn.Linear(3, 2)
    faults.check_row(7, {"loss": 0.5, "grad_norm": 1.0}, lin.named_parameters())  # all finite: no error
    with pytest.raises(faults.NonFiniteError, match="step 7: grad_norm is nan"):
        faults.check_row(7, {"loss": 0.5, "grad_norm": float("nan")}, lin.named_parameters())
    with torch.no_grad():
        lin.bias[1] = float("inf")
    with pytest.raises(faults.NonFiniteError, match="step 7: parameter bias"):
        faults.check_row(7, {"loss": 0.5, "grad_norm": 1.0}, lin.named_parameters())
    faults.check_after_update(3, lin.named_parameters())  # switch off: no check, no sync
    with faults.checked_step(1):  # steps 1..FINITE_CHECK_STEPS run with the switch on
        with pytest.raises(faults.NonFiniteError, match="step 1: parameter bias"):
            faults.check_after_update(1, lin.named_parameters())
        with pytest.raises(faults.NonFiniteError, match="step 1: loss is inf"):
            faults.check_before_update(1, torch.tensor(float("inf")), torch.tensor(1.0))
    with pytest.raises(faults.NonFiniteError, match="step 2: loss input advantages"):
        with faults.checked_step(2):
            fastpmd.pmd_loss(lp, lp, torch.tensor([float("nan")]), torch.ones(1, 2, dtype=torch.bool), tau=0.1)
    with faults.checked_step(3):  # past the first steps: no checks
        fastpmd.pmd_loss(lp, lp, torch.tensor([float("nan")]), torch.ones(1, 2, dtype=torch.bool), tau=0.1)


@pytest.mark.slow
def test_two_processes_skip_a_corrupted_shard(tmp_path):
    """The manifest is hashed and verified collectively: a flipped byte in rank 1's shard makes both ranks
    skip that checkpoint and resume the older one together."""
    import os
    import sys

    from test_resume import TINY

    def cmd(*extra):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                "fastpmd.train", *TINY, "--save-every", "1", "--out", str(tmp_path), *extra]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd("--max-steps", "2"), capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    manifest = json.loads((tmp_path / "checkpoints" / "step_000002" / "manifest.json").read_text())["files"]
    assert {"rank0.pt", "rank1.pt", ".metadata"} <= set(manifest) and len(manifest) >= 5
    _flip(tmp_path / "checkpoints" / "step_000002" / "__1_0.distcp", 1)
    proc = subprocess.run(cmd("--max-steps", "3", "--resume"), capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "skipped checkpoint" in proc.stderr and "checksum mismatch in __1_0.distcp" in proc.stderr
    assert _train_steps(tmp_path) == [1, 2, 3]
