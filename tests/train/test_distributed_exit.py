"""`shutdown_distributed` ends every gloo backend before the interpreter finalizes.

A process group left alive past `destroy_process_group` is torn down during interpreter finalization, which
rarely aborts the process after a finished run ("terminate called without an active exception", exit -6: it
cost 2 of 3 clean-clone CI runs one 2-rank test). Whether a group survived is deterministic, unlike the abort:
its gloo threads (`gloo_tcp_loop`, `pt_gloo_runloop`) are still there. Each case runs in a fresh interpreter
(a world of one through `init_distributed`), because the holders are import-order and process-wide caches."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread names from /proc (Linux)")

_SCRIPT = """
import os, sys, torch
from fastpmd.train.distributed import init_distributed, shutdown_distributed
torch.set_num_threads(1)
if "train" in sys.argv:  # a whole run through the CLI: FSDP2 (DTensor caches: specs -> DeviceMesh -> its groups)
    from fastpmd.train.cli import main
    assert main(sys.argv[2:]) == 0
else:
    init_distributed("cpu")
    import torch._dynamo  # noqa: F401  binds torch.distributed.nn.functional's group=group.WORLD when first imported
    shutdown_distributed()
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(",".join(sorted(n for n in names if "gloo" in n)))
"""

_TRAIN = ["--preset", "tiny-arith", "--prompts-per-step", "2", "--group-size", "2", "--warmup-steps", "0",
          "--max-new-tokens", "3", "--max-steps", "1", "--no-progress", "--no-plots", "--no-export",
          "--set", "data.eval_size=0"]


@pytest.mark.parametrize("case", ["import-after-init", "train"])
def test_no_gloo_thread_survives_shutdown(case, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    args = [case, *_TRAIN, "--out", str(tmp_path / "run")] if case == "train" else [case]
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "", f"gloo threads alive after shutdown_distributed: {proc.stdout.strip()}"
