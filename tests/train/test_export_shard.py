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


def test_each_rank_keeps_only_its_shard(tmp_path):
    path = tmp_path / "problems.jsonl"
    rows = [{"problem": f"What is {i}+{i}?", "answer": str(2 * i)} for i in range(11)]
    rows.append(dict(rows[3]))  # a duplicate: dropped before sharding
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg, _ = build_config(TINY + ["--data", str(path), "--set", "data.task='math'"])
    everything = {p.prompt for p in load_problems(path)}
    assert len(everything) == 11
    W, shards = 3, []
    for r in range(W):
        task = Task(cfg, _Tok(), r, W)
        mine = {p.prompt for p in task.problems}
        shards.append(mine)
        drawn = [p.prompt for _ in range(3) for p in task.next_prompts(len(mine))]  # three epochs of its shard
        assert set(drawn) == mine and all(drawn.count(q) == 3 for q in mine)
        assert task.state_dict() == {"position": 3 * len(mine)}
    assert sorted(len(s) for s in shards) == [3, 4, 4]
    assert set.union(*shards) == everything and sum(map(len, shards)) == len(everything)  # disjoint, complete
    with pytest.raises(ValueError, match="rank 11's shard"):
        Task(cfg, _Tok(), 11, 12)
