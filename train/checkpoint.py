"""Checkpoints: torch.distributed.checkpoint (sharded model + optimizer, resharded by DCP on load), one
`trainer.pt` (scheduler, trainer state, data position: the same on every rank, so independent of the world size)
and a small per-rank file of RNG states, written atomically; and the Hugging Face export. A checkpoint loads on
another world size: DCP reshards the model and optimizer, `trainer.pt` is shared, and the per-rank RNG states are
restored only on the world size that wrote them (the trainer seeds its sampling, shuffles and draws per step).

Layout: OUT/checkpoints/step_000012/{.metadata, *.distcp, trainer.pt, rank0.pt, rank1.pt, ..., manifest.json} and
OUT/checkpoints/latest (a one-line file naming the newest complete checkpoint). A checkpoint is written to
`step_N.tmp`; its manifest (size and sha256 of every file, hashed in parallel: each rank hashes a share) is
written last, then the directory is renamed, then `latest` is replaced (os.replace): a run killed at any moment
leaves complete checkpoints only.

Resume (`find_checkpoint`) takes the newest `step_*` directory that verifies: `.metadata`, the manifest, every
file's size and checksum, and `trainer.pt` (older layout: this rank's `rank{r}.pt`). Anything that does not (a
truncated or altered `.distcp`, a missing file, a garbage `latest`) is skipped with a warning naming it, and the
next older one is tried. A checkpoint without a manifest (incomplete, or written before manifests existed) is
skipped the same way, unless the user asks for it (`unverified_ok`, run.resume_unverified): then it loads
unverified, with a warning.

A save that runs out of disk space (ENOSPC or EDQUOT, also inside DCP's CheckpointException; or a write error
with under 1 MiB left, which is how torch's writer reports it) removes its `step_N.tmp` and raises DiskFullError
on every rank, one line naming the path and the free space; older checkpoints are untouched.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from .model import hf_state_key


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


MANIFEST = "manifest.json"
TRAINER_FILE = "trainer.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """--resume found checkpoints but none of them loads."""


class DiskFullError(RuntimeError):
    """A save ran out of disk space; its partial directory is removed, older checkpoints are intact."""


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(obj) -> list:
    rank, world = _rank_world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def sha256(path: Path, block: int = 8 * 2**20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)


def _hash_share(directory: Path, names: list[str]) -> dict[str, dict]:
    """Collective: {name: {bytes, sha256}} of every file, each rank hashing every world-th one."""
    rank, world = _rank_world()
    mine = {n: {"bytes": (directory / n).stat().st_size, "sha256": sha256(directory / n)}
            for i, n in enumerate(names) if i % world == rank}
    return {k: v for part in _gather(mine) for k, v in part.items()}


def write_manifest(directory: Path) -> None:
    """Collective: write directory/manifest.json (atomically) once every file of the checkpoint is there."""
    entries = _hash_share(directory, _files(directory))
    if _rank_world()[0] == 0:
        tmp = directory / (MANIFEST + ".tmp")
        with tmp.open("w") as f:
            json.dump({"files": entries}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / MANIFEST)


def _precheck(directory: Path) -> tuple[str | None, dict | None]:
    """This rank's cheap checks: (problem or None, expected {name: (bytes, sha256)} or None without manifest)."""
    rank, _ = _rank_world()
    if not (directory / ".metadata").is_file():
        return "missing .metadata", None
    if not (directory / TRAINER_FILE).is_file() and not (directory / f"rank{rank}.pt").is_file():
        return f"missing rank{rank}.pt (an older checkpoint without {TRAINER_FILE}: same world size only)", None
    mf = directory / MANIFEST
    if not mf.is_file():
        return None, None
    try:
        files = json.loads(mf.read_text())["files"]
        expected = {str(k): (int(v["bytes"]), str(v["sha256"])) for k, v in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"unreadable {MANIFEST} ({e})", None
    for name, (size, _) in sorted(expected.items()):  # presence and size before any hashing
        path = directory / name
        if not path.is_file():
            return f"missing {name}", None
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, the manifest says {size} (truncated?)", None
    return None, expected


def verify(directory: Path, unverified_ok: bool = False) -> tuple[str | None, str | None]:
    """Collective (every rank gets the same answer): (problem, note). problem: why `directory` cannot be
    loaded (None if it can); note: a remark for a loadable one (no manifest, unverified_ok: not verified)."""
    problem, expected = _precheck(directory)
    problems = [p for p in _gather(problem) if p is not None]
    if problems:
        return problems[0], None
    if expected is None and not unverified_ok:
        return (f"no {MANIFEST} (incomplete; a checkpoint written before manifests loads only with "
                "run.resume_unverified, --resume-unverified)"), None
    if expected is None:
        return None, f"{directory.name} has no {MANIFEST}: loaded without verification (run.resume_unverified)"
    got = _hash_share(directory, sorted(expected))
    bad = [n for n in sorted(expected) if got[n]["sha256"] != expected[n][1]]
    if bad:
        return f"checksum mismatch in {', '.join(bad)} (corrupted)", None
    return None, None


def find_checkpoint(out: str | Path, unverified_ok: bool = False) -> tuple[int | None, list[str]]:
    """Collective: (step of the newest checkpoint under OUT/checkpoints that verifies, or None; warnings naming
    what was skipped). Raises CheckpointError when checkpoints exist but none loads. unverified_ok: one
    without a manifest loads too (see verify)."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return None, []
    warnings = []
    pointer = root / "latest"
    if pointer.exists():
        name = pointer.read_text(errors="replace").strip() if pointer.is_file() else ""
        if not _STEP_DIR.match(name) or not (root / name).is_dir():
            warnings.append(f"{pointer} names {name[:80]!r}, not a checkpoint directory: ignored")
    steps = sorted((int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))),
                   reverse=True)
    for step in steps:
        problem, note = verify(_step_dir(root, step), unverified_ok)
        if problem is None:
            return step, warnings + ([note] if note else [])
        warnings.append(f"skipped checkpoint {_step_dir(root, step)}: {problem}")
    if steps:
        raise CheckpointError(f"run.resume: no checkpoint under {root} loads: " + "; ".join(warnings))
    return None, warnings


def resume_step(out: str | Path, warn: bool = True, unverified_ok: bool = False) -> int | None:
    """Collective: find_checkpoint, printing its warnings (and "no checkpoint: starting fresh") on stderr."""
    step, warnings = find_checkpoint(out, unverified_ok)
    if step is None:
        warnings.append(f"--resume: no checkpoint under {Path(out) / 'checkpoints'}; starting a fresh run")
    if warn:
        for w in warnings:
            print(f"fastpmd train: warning: {w}", file=sys.stderr, flush=True)
    return step


NEARLY_FULL = 2**20  # bytes: a write that fails with less than this left on its file system ran out of space


def _full_errno(e: BaseException) -> bool:
    """e is an ENOSPC/EDQUOT OSError, or DCP's CheckpointException (or an exception chain) around one."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    inner = [exc for exc, _ in e.failures.values()] if isinstance(e, CheckpointException) else []
    return any(_full_errno(x) for x in inner + [c for c in (e.__cause__, e.__context__) if c is not None])


def _free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _no_space(e: BaseException, partial: Path) -> bool:
    """e (raised writing `partial`) means a full disk: it carries ENOSPC/EDQUOT, or it is any write error with
    less than NEARLY_FULL bytes left (torch's own file writer, which DCP uses for the shards, reports a write cut
    short by a full disk as a RuntimeError without errno)."""
    return _full_errno(e) or _free_bytes(partial) < NEARLY_FULL


_OLDER_INTACT = "the checkpoints saved before are intact (--resume continues from the newest)"


def _save_part(partial: Path, write, note: str = _OLDER_INTACT) -> None:
    """Collective: this rank's part of a save, `write()`, then a gather of every rank's outcome. If any
    rank runs out of disk space, rank 0 removes `partial` (what is being written) and every rank raises
    DiskFullError naming it, the free space and `note` (also the ranks whose own disk is not the full one, as
    DCP raises the same CheckpointException everywhere); another write error is raised after the gather."""
    error = problem = None
    try:
        write()
    except (OSError, RuntimeError, CheckpointException) as e:
        error = e
        if _no_space(e, partial):
            problem = f"no space left on device writing {partial} ({_free_bytes(partial) / 2**20:.1f} MiB free)"
    problems = [p for p in _gather(problem) if p is not None]  # every rank's answer: also the barrier
    if problems:
        if _rank_world()[0] == 0:
            shutil.rmtree(partial, ignore_errors=True) if partial.is_dir() else partial.unlink(missing_ok=True)
        raise DiskFullError(f"{problems[0]}; removed it, {note}")
    if error is not None:
        raise error


def _write_rank_file(path: Path, state: dict) -> None:
    """torch.save through memory, so that a full disk raises OSError ENOSPC (torch's own file writer reports it
    as a RuntimeError without errno)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    path.write_bytes(buf.getvalue())


def _publish(root: Path, tmp: Path, final: Path, keep: int) -> None:
    """Rank 0: rename the complete `tmp` to `final`, point `latest` at it, prune all but the newest `keep`."""
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = root / "latest.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / "latest")
    done = sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def save(out: str | Path, step: int, model, optimizer, extra: dict, keep: int = 2) -> Path:
    """Collective: every rank calls it. `extra` (picklable, the same on every rank: scheduler, trainer and data
    state) is written once; each rank writes its RNG states. Raises DiskFullError (every rank) when the disk fills
    up; the checkpoints saved before stay as they were."""
    root = Path(out) / "checkpoints"
    final, tmp = _step_dir(root, step), _step_dir(root, step).with_suffix(".tmp")
    rank = dist.get_rank() if dist.is_initialized() else 0

    def start():
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left over by a run killed mid-save
            tmp.mkdir(parents=True)

    _save_part(tmp, start)
    msd, osd = get_state_dict(model, optimizer)
    _save_part(tmp, lambda: dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp)))

    def write_states():
        if rank == 0:
            _write_rank_file(tmp / TRAINER_FILE, {**extra, "world_size": _rank_world()[1]})
        _write_rank_file(tmp / f"rank{rank}.pt", {"rng": rng_state()})

    _save_part(tmp, write_states)
    _save_part(tmp, lambda: write_manifest(tmp))  # last: a directory with a manifest is complete
    _save_part(root / "latest.tmp", lambda: _publish(root, tmp, final, keep) if rank == 0 else None,
               f"{final} is complete (--resume finds the newest checkpoint that verifies without `latest`)")
    return final


def load(out: str | Path, step: int, model, optimizer) -> dict:
    """Collective: restore model and optimizer in place (resharded to this world size), and the RNG states when
    the world size is the one that wrote them; returns the `extra` dict."""
    path = _step_dir(Path(out) / "checkpoints", step)
    rank = dist.get_rank() if dist.is_initialized() else 0
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rank_file = path / f"rank{rank}.pt"
    if not (path / TRAINER_FILE).is_file():  # older layout: everything in the per-rank files
        if not rank_file.is_file():
            raise ValueError(f"run.resume: {rank_file} missing (a checkpoint without {TRAINER_FILE} loads on the "
                             "world size that wrote it only)")
        extra = torch.load(rank_file, weights_only=False)
        set_rng_state(extra.pop("rng"))
        return extra
    extra = torch.load(path / TRAINER_FILE, weights_only=False)
    if extra.pop("world_size") == _rank_world()[1]:
        set_rng_state(torch.load(rank_file, weights_only=False)["rng"])
    return extra


def load_full_state(model, full_state: dict) -> None:
    """Collective: fill a sharded (materialised, uninitialised) model from rank 0's full state dict."""
    set_model_state_dict(model, full_state,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def export_hf(out_dir: str | Path, model, hf_module, tokenizer=None, dtype: torch.dtype = torch.bfloat16) -> Path | None:
    """Collective: gather the full state dict to rank 0 (on CPU) and `save_pretrained` it as safetensors, its
    floating tensors cast to `dtype` (the trainer passes its compute dtype: bf16 by default, half of fp32)."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rank = dist.get_rank() if dist.is_initialized() else 0
    path = Path(out_dir)
    if rank == 0:
        sd = {hf_state_key(k): v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        cfg = hf_module.config
        import transformers

        with torch.device("meta"):
            plain = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        plain.load_state_dict(sd, strict=False, assign=True)  # non-persistent buffers are not in sd
        plain.save_pretrained(path, state_dict=sd, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
    _barrier()
    return path if rank == 0 else None
