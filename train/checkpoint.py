"""Checkpoints: torch.distributed.checkpoint (sharded model + optimizer) plus a small per-rank file (scheduler,
trainer state, data position, RNG states), written atomically; and the Hugging Face export.

Layout: OUT/checkpoints/step_000012/{.metadata, *.distcp, rank0.pt, rank1.pt, ...} and OUT/checkpoints/latest
(a one-line file naming the newest complete checkpoint). A checkpoint is written to `step_N.tmp`, then renamed,
then `latest` is replaced (os.replace): a run killed at any moment leaves `latest` pointing at a complete one.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
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


def latest_step(out: str | Path) -> int | None:
    """Step of the newest complete checkpoint under OUT/checkpoints, or None."""
    f = Path(out) / "checkpoints" / "latest"
    if not f.is_file():
        return None
    name = f.read_text().strip()
    if not (Path(out) / "checkpoints" / name / ".metadata").is_file():
        raise ValueError(f"run.resume: {f} names {name!r}, which is not a complete checkpoint")
    return int(name.split("_")[-1])


def save(out: str | Path, step: int, model, optimizer, extra: dict, keep: int = 2) -> Path:
    """Collective: every rank calls it. `extra` (picklable, per rank) holds scheduler/trainer/data/RNG state."""
    root = Path(out) / "checkpoints"
    final, tmp = _step_dir(root, step), _step_dir(root, step).with_suffix(".tmp")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a run killed mid-save
        tmp.mkdir(parents=True)
    _barrier()
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    torch.save({**extra, "rng": rng_state()}, tmp / f"rank{rank}.pt")
    _barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = root / "latest.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / "latest")
        done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load(out: str | Path, step: int, model, optimizer) -> dict:
    """Collective: restore model, optimizer and RNG in place; returns this rank's `extra` dict."""
    path = _step_dir(Path(out) / "checkpoints", step)
    rank = dist.get_rank() if dist.is_initialized() else 0
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extra_file = path / f"rank{rank}.pt"
    if not extra_file.is_file():
        raise ValueError(f"run.resume: {extra_file} missing (was the checkpoint written with another world size?)")
    extra = torch.load(extra_file, weights_only=False)
    set_rng_state(extra.pop("rng"))
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
