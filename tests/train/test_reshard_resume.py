"""Resume on another world size: a checkpoint written by 2 gloo ranks loads on 1, 2 and 4 ranks with the same
weights (DCP reshards model and optimizer), the same trainer state and the same data order for the next step."""
import json
import shutil

import pytest
from train_helpers import torchrun

WORKER = """\
import json, sys
import torch, torch.distributed as dist
from fastpmd.train.cli import build_config
from fastpmd.train.distributed import init_distributed
from fastpmd.train.trainer import Trainer
torch.set_num_threads(1)
out, mode = sys.argv[1], sys.argv[2]
flags = ["--preset", "tiny-arith", "--prompts-per-step", "8", "--group-size", "2", "--mini-batches", "2",
         "--warmup-steps", "0", "--max-new-tokens", "3", "--no-progress", "--no-export", "--no-plots",
         "--set", "data.eval_size=0", "--out", out + "/run", "--max-steps", "1", "--save-every", "1"]
cfg, _ = build_config(flags + (["--resume"] if mode == "resume" else []))
d = init_distributed("cpu")
tr = Trainer(cfg, d)
if mode == "save":
    tr.fit()
else:
    step = tr._resume()
    parts = [None] * d.world_size
    dist.all_gather_object(parts, [p.prompt for p in tr.task.next_prompts(tr.p_local)])
    full = {n: p.full_tensor() for n, p in tr.policy.named_parameters()}
    exp_avg = [s["exp_avg"].full_tensor().double().sum().item() for s in tr.optimizer.state.values()]
    if d.rank == 0:
        json.dump({"step": step, "prompts": sum(parts, []), "sched": tr.scheduler.state_dict()["last_epoch"],
                   "weights": sum(v.double().sum().item() for v in full.values()), "exp_avg": sum(exp_avg)},
                  open(out + f"/world{d.world_size}.json", "w"))
del tr  # the FSDP modules and their groups go before the groups are destroyed
from fastpmd.train.distributed import shutdown_distributed
shutdown_distributed()  # no group left for interpreter finalization to tear down
"""


@pytest.mark.slow
def test_checkpoint_of_two_ranks_resumes_on_one_and_four(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    torchrun(WORKER, base, 2, "save")
    res = {}
    for world in (2, 1, 4):
        d = tmp_path / f"w{world}"
        shutil.copytree(base, d)
        torchrun(WORKER, d, world, "resume")
        res[world] = json.loads((d / f"world{world}.json").read_text())
    ref = res[2]
    assert ref["step"] == 1 and len(ref["prompts"]) == 8
    for world in (1, 4):
        r = res[world]
        assert (r["step"], r["prompts"], r["sched"]) == (ref["step"], ref["prompts"], ref["sched"])
        assert r["weights"] == pytest.approx(ref["weights"], rel=1e-12)
        assert r["exp_avg"] == pytest.approx(ref["exp_avg"], rel=1e-12)
