"""Every tensor the trainer hands to a torch.distributed collective lives on the trainer's device: a full step
(rollout, old log-probs, update, metrics), an eval and a checkpoint on two gloo processes, with every collective
wrapped (tests/collective_check.py; FASTPMD_COLLECTIVE_DEVICE=cuda makes a GPU run assert cuda)."""
import json
import textwrap
from pathlib import Path

import pytest
import torch
from collective_check import watch_collectives
from train_helpers import torchrun

from fastpmd.train.distributed import init_distributed, shutdown_distributed

WORKER = textwrap.dedent('''
    import json, os, sys
    import torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[2])
    from collective_check import watch_collectives
    from fastpmd.train.cli import build_config
    from fastpmd.train.distributed import init_distributed
    from fastpmd.train.trainer import Trainer

    torch.set_num_threads(1)
    out = sys.argv[1]
    cfg, _ = build_config(["--out", out + "/run", "--prompts-per-step", "4", "--group-size", "2", "--mini-batches",
                           "1", "--warmup-steps", "1", "--max-steps", "1", "--eval-n", "2", "--max-new-tokens", "4",
                           "--no-progress", "--no-plots", "--set", "data.eval_size=5", *sys.argv[3:]])
    d = init_distributed(cfg.run.device)
    tr = Trainer(cfg, d)
    with watch_collectives(os.environ.get("FASTPMD_COLLECTIVE_DEVICE")) as calls:
        tr.fit()
    names = sorted({name for name, _ in calls})
    if d.rank == 0:
        json.dump({"names": names, "count": len(calls)}, open(out + "/calls.json", "w"))
    del tr  # the FSDP modules and their groups go before the groups are destroyed
    from fastpmd.train.distributed import shutdown_distributed
    shutdown_distributed()  # no group left for interpreter finalization to tear down
''')


def test_check_catches_a_host_tensor_on_a_cuda_run():
    """The hook: a run that says its device is cuda fails on a CPU tensor (what NCCL would reject)."""
    torch.set_num_threads(1)
    init_distributed("cpu")
    try:
        with watch_collectives() as calls:
            torch.distributed.all_reduce(torch.ones(2))
        assert calls == [("all_reduce", "cpu")]
        with pytest.raises(AssertionError, match="all_reduce: a tensor on cpu, expected cuda"):
            with watch_collectives("cuda"):
                torch.distributed.all_reduce(torch.ones(2))
    finally:
        shutdown_distributed()


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["--set", "optim.micro_batch_tokens=64"]], ids=["by-count", "by-tokens"])
def test_trainer_collectives_on_the_group_device(tmp_path, flags):
    """By tokens, the sequences also move between the ranks (train/rank_balance.py's all-gather and all-to-all)."""
    torchrun(WORKER, tmp_path, 2, str(Path(__file__).parents[1]), *flags)
    seen = json.loads((tmp_path / "calls.json").read_text())
    assert seen["count"] > 0 and "all_reduce" in seen["names"], seen
    assert ("all_to_all_single" in seen["names"]) == bool(flags), seen
