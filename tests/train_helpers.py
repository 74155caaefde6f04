"""Shared by the trainer tests: a world of one in this process, and a worker script under torchrun."""
import os
import subprocess
import sys

import pytest
import torch

from fastpmd.train.distributed import init_distributed, shutdown_distributed


@pytest.fixture
def world_of_one():
    torch.set_num_threads(1)
    d = init_distributed("cpu")
    yield d
    shutdown_distributed()


def torchrun(worker: str, tmp_path, world: int, *args: str, timeout: int = 300) -> None:
    """Write `worker` to tmp_path/worker.py and run it on `world` gloo processes: argv = [tmp_path, *args]."""
    script = tmp_path / "worker.py"
    script.write_text(worker)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", str(script),
           str(tmp_path), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
