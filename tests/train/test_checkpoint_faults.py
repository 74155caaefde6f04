"""Checkpoints fail closed: a checkpoint without manifest.json is skipped by --resume unless the user asks for
unverified ones (run.resume_unverified); a disk that fills up during a save ends the run with one line naming
the path and the free space, removes the partial checkpoint, and leaves the older ones to resume from."""
import errno
import os
import pathlib
from types import SimpleNamespace

import pytest
import torch

from fastpmd.train import checkpoint
from fastpmd.train import cli as train_cli
from test_faults import _flip, _train_steps
from test_resume import TINY


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


def _no_space_writing(monkeypatch, name):
    """pathlib's write_bytes / write_text fail with ENOSPC for a file called `name`."""
    for method in ("write_bytes", "write_text"):
        real = getattr(pathlib.Path, method)

        def write(self, data, *a, _real=real, **k):
            if self.name == name:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
            return _real(self, data, *a, **k)

        monkeypatch.setattr(pathlib.Path, method, write)


# where the disk fills up -> (the file named in the message, what is left, the step a resume uses)
DISK_FULL = {"shards": ("step_000002.tmp", ["latest", "step_000001"], 1),
             "rank file": ("step_000002.tmp", ["latest", "step_000001"], 1),
             "latest pointer": ("latest.tmp", ["latest", "step_000001", "step_000002"], 2)}


@pytest.mark.parametrize("where", sorted(DISK_FULL))
def test_disk_full_during_save_keeps_what_was_saved(tmp_path, monkeypatch, where):
    named, left, resume_at = DISK_FULL[where]
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    checkpoint.save(tmp_path, 1, model, opt, {"step": 1})
    if where == "shards":
        _disk_full_during(monkeypatch, tmp_path / "checkpoints" / "step_000002.tmp")
    else:
        _no_space_writing(monkeypatch, "rank0.pt" if where == "rank file" else "latest.tmp")
    with pytest.raises(checkpoint.DiskFullError) as e:
        checkpoint.save(tmp_path, 2, model, opt, {"step": 2})
    msg = str(e.value)
    assert "\n" not in msg and named in msg and "MiB free" in msg and "no space left" in msg, msg
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == left  # the partial file is removed
    monkeypatch.undo()
    assert checkpoint.find_checkpoint(tmp_path) == (resume_at, [])


@pytest.mark.parametrize("free,full", [(0, True), (2**30, False)])
def test_write_error_without_errno_is_disk_full_only_when_the_disk_is(tmp_path, monkeypatch, free, full):
    """torch's file writer (DCP's shards) reports a write cut short by a full disk as a RuntimeError without
    errno: it counts as a full disk when under a MiB is left, else it is raised as it is."""
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())

    def short_write(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(checkpoint.dcp, "save", short_write)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: SimpleNamespace(free=free))
    with pytest.raises(checkpoint.DiskFullError if full else RuntimeError) as e:
        checkpoint.save(tmp_path, 1, model, opt, {"step": 1})
    if full:
        assert "step_000001.tmp (0.0 MiB free)" in str(e.value)
        assert not (tmp_path / "checkpoints" / "step_000001.tmp").exists()
    else:
        assert "unexpected pos" in str(e.value)


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
