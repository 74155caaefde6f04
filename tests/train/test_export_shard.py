"""The HF export is written in the trainer's compute dtype (bf16 by default, configurable), and each rank keeps
only its shard of the prompt file: disjoint shards whose union is the data set, prompts drawn from it alone."""
import json

import pytest
import torch
from safetensors import safe_open

from fastpmd.train.cli import build_config
from fastpmd.train.task.data import load_problems
from fastpmd.train.distributed import init_distributed, shutdown_distributed
from fastpmd.train.task.prompts import Task
from fastpmd.train.trainer import Trainer

TINY = ["--preset", "tiny-arith", "--prompts-per-step", "4", "--group-size", "2", "--mini-batches", "1",
        "--warmup-steps", "0", "--max-new-tokens", "3", "--no-progress", "--no-plots", "--set", "data.eval_size=0",
        "--max-steps", "1"]


@pytest.mark.parametrize("flags, want", [(["--param-dtype", "bfloat16"], torch.bfloat16),  # auto: the compute dtype
                                         (["--set", "run.export_dtype=bfloat16"], torch.bfloat16),
                                         ([], torch.float32)])  # the CPU demo computes in fp32
def test_export_dtype(tmp_path, flags, want):
    torch.set_num_threads(1)
    d = init_distributed("cpu")
    try:
        cfg, _ = build_config(TINY + ["--out", str(tmp_path)] + flags)
        tr = Trainer(cfg, d)
        tr.fit()
        params = {n[3:]: p.full_tensor() for n, p in tr.policy.named_parameters()}
    finally:
        shutdown_distributed()
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert set(keys) == set(params)
        for k in keys:
            t = f.get_tensor(k)
            assert t.dtype == want, k
            assert torch.equal(t, params[k].to(want)), k
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == str(want).split(".")[-1]


class _Tok:
    def encode_prompt(self, text):
        return [1] * (1 + len(text) % 7)


def test_data_order_does_not_depend_on_the_world_size(tmp_path):
    path = tmp_path / "problems.jsonl"
    rows = [{"problem": f"What is {i}+{i}?", "answer": str(2 * i)} for i in range(12)]
    rows.append(dict(rows[3]))  # a duplicate: dropped
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg, _ = build_config(TINY + ["--data", str(path), "--set", "data.task='math'"])
    everything = {p.prompt for p in load_problems(path)}
    assert len(everything) == 12
    one = Task(cfg, _Tok(), 0, 1)
    steps = [[p.prompt for p in one.next_prompts(6)] for _ in range(4)]  # 4 steps of 6 prompts: two epochs
    assert set(steps[0] + steps[1]) == everything and set(steps[2] + steps[3]) == everything
    for W in (2, 3):  # each rank its slice of the same steps; the checkpointed position is the same number
        tasks = [Task(cfg, _Tok(), r, W) for r in range(W)]
        for step in steps:
            assert [p.prompt for t in tasks for p in t.next_prompts(6 // W)] == step
        assert all(t.state_dict() == one.state_dict() == {"position": 24} for t in tasks)
    resumed = Task(cfg, _Tok(), 1, 3)  # a checkpoint of the 1-rank run resumed on 3 ranks
    resumed.load_state_dict({"position": 12})
    assert [p.prompt for p in resumed.next_prompts(2)] == steps[2][2:4]
    arith, _ = build_config(TINY)
    a1, a2 = Task(arith, _Tok(), 0, 1), [Task(arith, _Tok(), r, 2) for r in range(2)]
    assert [p.prompt for p in a1.next_prompts(8)] == [p.prompt for t in a2 for p in t.next_prompts(4)]
    assert a1.state_dict() == a2[0].state_dict() == a2[1].state_dict()
