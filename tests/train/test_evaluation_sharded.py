"""Evaluation sharded across ranks: through Trainer.evaluate, two gloo processes each sample only their eval
chunks and the gathered result equals the one-process eval exactly."""
import json
import textwrap

import pytest
from train_helpers import torchrun

WORKER = textwrap.dedent('''
    import json, sys
    import torch, torch.distributed as dist
    from fastpmd.train.cli import build_config
    from fastpmd.train.distributed import init_distributed
    from fastpmd.train.trainer import Trainer

    torch.set_num_threads(1)
    out = sys.argv[1]
    cfg, _ = build_config(["--out", out + "/run", "--prompts-per-step", "4", "--group-size", "2",
                           "--mini-batches", "1", "--warmup-steps", "0", "--eval-n", "4", "--no-progress",
                           "--set", "data.eval_size=10", "--set", "rollout.eval_batch_size=3"])
    d = init_distributed("cpu")
    tr = Trainer(cfg, d)
    seen = []
    generate = tr.engine.generate
    tr.engine.generate = lambda prompts, sampling: seen.append(len(prompts)) or generate(prompts, sampling)
    texts, decode = [], tr.tok.decode
    tr.tok.decode = lambda ids: texts.append(decode(ids)) or texts[-1]
    res = tr.evaluate()
    json.dump({"result": res, "prompts": seen, "texts": texts}, open(out + f"/rank{d.rank}_world{d.world_size}.json", "w"))
    del tr  # the FSDP modules and their groups go before the groups are destroyed
    from fastpmd.train.distributed import shutdown_distributed
    shutdown_distributed()  # no group left for interpreter finalization to tear down
''')


def _run(tmp_path, world):
    torchrun(WORKER, tmp_path, world)
    return [json.loads((tmp_path / f"rank{r}_world{world}.json").read_text()) for r in range(world)]


@pytest.mark.slow
def test_sharded_eval_equals_unsharded(tmp_path):
    (one,) = _run(tmp_path, 1)
    two = _run(tmp_path, 2)
    assert one["prompts"] == [3, 3, 3, 1]  # 10 problems in chunks of 3
    assert two[0]["prompts"] == [3, 3] and two[1]["prompts"] == [3, 1]  # chunks 0, 2 | 1, 3
    assert one["result"]["num_problems"] == 10.0
    assert two[0]["result"] == one["result"] and two[1]["result"] == one["result"]
    # the samples themselves: the two ranks' responses are exactly the one process's (random model: varied)
    assert sorted(two[0]["texts"] + two[1]["texts"]) == sorted(one["texts"])
    assert len(one["texts"]) == 40 and len(set(one["texts"])) > 20
