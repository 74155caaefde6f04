"""Checkpoints fail closed: a checkpoint without manifest.json is skipped by --resume unless the user asks for
unverified ones (run.resume_unverified); a disk that fills up during a save ends the run with one line naming
the path and the free space, removes the partial checkpoint, and leaves the older ones to resume from."""
import errno
import os

import pytest
import torch

from fastpmd.train import checkpoint
from fastpmd.train import cli as train_cli
from test_train_faults import _flip, _train_steps
from test_train_resume import TINY


def _fake_checkpoint(root, step, manifest=True):
    d = root / "checkpoints" / f"step_{step:06d}"
    d.mkdir(parents=True)
    (d / ".metadata").write_bytes(b"m" * 100)
    (d / "__0_0.distcp").write_bytes(bytes(range(256)) * 64)
    (d / "rank0.pt").write_bytes(b"r" * 10)
    if manifest:
        checkpoint.write_manifest(d)
    return d


def test_checkpoint_without_manifest_is_skipped_unless_asked_for(tmp_path):
    _fake_checkpoint(tmp_path, 1)
    newest = _fake_checkpoint(tmp_path, 2)
    (newest / "manifest.json").unlink()
    _flip(newest / "__0_0.distcp")  # nothing can tell this apart from an intact one without the manifest
    step, warnings = checkpoint.find_checkpoint(tmp_path)
    assert step == 1
    assert any("skipped checkpoint" in w and "step_000002" in w and "manifest.json" in w for w in warnings), warnings
    step, warnings = checkpoint.find_checkpoint(tmp_path, unverified_ok=True)  # the user asked for it
    assert step == 2 and any("without verification" in w for w in warnings), warnings


def test_only_unverified_checkpoints_is_an_error_naming_the_option(tmp_path):
    (_fake_checkpoint(tmp_path, 1) / "manifest.json").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="resume_unverified"):
        checkpoint.find_checkpoint(tmp_path)


def test_resume_unverified_needs_resume(tmp_path, capsys):
    assert train_cli.main(["--resume-unverified", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run.resume_unverified" in err[0], err


def _disk_full_during(monkeypatch, path):
    """os.fsync (DCP's writer and the manifest call it) fails with ENOSPC while `path` exists."""
    real = os.fsync

    def fsync(fd):
        if path.exists():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    checkpoint.save(tmp_path, 1, model, opt, {"step": 1})
    _disk_full_during(monkeypatch, tmp_path / "checkpoints" / "step_000002.tmp")
    with pytest.raises(checkpoint.DiskFullError) as e:
        checkpoint.save(tmp_path, 2, model, opt, {"step": 2})
    msg = str(e.value)
    assert "\n" not in msg and "step_000002.tmp" in msg and "free" in msg and "no space left" in msg, msg
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_000001"]  # the partial one is removed
    assert checkpoint.find_checkpoint(tmp_path) == (1, [])


@pytest.mark.slow
def test_disk_full_ends_the_run_in_one_line_and_resume_continues(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = [*TINY, "--out", str(out), "--max-steps", "2", "--save-every", "1", "--no-export"]
    _disk_full_during(monkeypatch, out / "checkpoints" / "step_000002.tmp")
    assert train_cli.main(argv) == 1
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if "fastpmd train:" in ln]
    assert len(err) == 1 and err[0].startswith("fastpmd train: error: ") and "step_000002.tmp" in err[0], err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_000001"]
    monkeypatch.undo()
    assert train_cli.main([*argv, "--resume"]) == 0
    assert _train_steps(out) == [1, 2]
