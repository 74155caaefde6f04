"""Shared by the trainer tests: a worker script under torchrun (the world-of-one fixture is in conftest.py)."""
import os
import subprocess
import sys
import textwrap


def torchrun(worker: str, tmp_path, world: int, *args: str, timeout: int = 300) -> None:
    """Write `worker` to tmp_path/worker.py and run it on `world` gloo processes: argv = [tmp_path, *args]."""
    script = tmp_path / "worker.py"
    script.write_text(worker)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", str(script),
           str(tmp_path), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]


# appended to a worker that ran `rc = main(...)`: exit 3 when a gloo thread is left after the run (a process group
# that outlived shutdown_distributed, torn down later in interpreter finalization: tests/train/test_distributed_exit.py)
GLOO_LEFT_EXIT = """
import os
_gloo = sorted(n for n in (open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
               if "gloo" in n)
if _gloo:
    print("gloo threads left after the run:", _gloo, file=sys.stderr)
sys.exit(3 if _gloo else rc)
"""


_TRAINER_WORKER = """\
import dataclasses, json, random, sys
import torch, torch.distributed as dist
import fastpmd
from fastpmd.train.cli import build_config
from fastpmd.train.packing import pack_batch
from fastpmd.train.distributed import init_distributed
from fastpmd.train.trainer import Trainer, loss_config

torch.set_num_threads(1)
out = sys.argv[1]
cfg, _ = build_config(["--out", out + "/run", "--prompts-per-step", "8", "--group-size", "4", "--mini-batches", "1",
                       "--warmup-steps", "0", "--no-progress", "--set", "model.activation_checkpointing=True",
                       *{extra!r}])
d = init_distributed("cpu")
tr = Trainer(cfg, d)
P, n, W = 8, 4, d.world_size
g = torch.Generator().manual_seed(0)
prompts = [tr.task.encode(p) for p in tr.task.arithmetic.sample(P, random.Random(0))]
"""


def trainer_worker(extra_flags: list[str], body: str) -> str:
    """A torchrun worker script: a tiny-arith Trainer on this rank (8 prompts x 4 responses, one mini-batch,
    activation checkpointing, no warm-up; `extra_flags` appended), its 8 prompts `prompts`, a seeded generator `g`,
    then `body` (indented like a module-level block inside a triple-quoted string; dedented here)."""
    return _TRAINER_WORKER.format(extra=list(extra_flags)) + textwrap.dedent(body)
