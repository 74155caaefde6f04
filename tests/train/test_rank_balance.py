"""Sequences balanced across ranks (`optim.balance_ranks` with `optim.micro_batch_tokens`, train/rank_balance.py):
the planner's bound, the exchange on two gloo processes (every row arrives once, exactly as `pack_batch` would
have built it, the ranks' tokens even), and whole RL steps with and without balancing on two processes (same
loss and gradient norm, smaller token imbalance)."""
import json
import random

import pytest
from train_helpers import torchrun

from fastpmd.train.rank_balance import plan_owners

EXCHANGE_WORKER = '''
import json, sys
import torch, torch.distributed as dist
from fastpmd.train.distributed import init_distributed
from fastpmd.train.packing import pack_batch
from fastpmd.train.rank_balance import exchange

torch.set_num_threads(1)
out = sys.argv[1]
d = init_distributed("cpu")
W, B = d.world_size, 12
g = torch.Generator().manual_seed(0)
# every rank builds all ranks' rows (the same seed); rank r holds rows r*B .. r*B + B - 1; rank 0's are long
prompts = [torch.randint(3, 50, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
           for _ in range(W * B)]
responses = [torch.randint(3, 50, (int(torch.randint(1, 4, (1,), generator=g)) + (9 if i < B else 0),),
                           generator=g).tolist() for i in range(W * B)]
minibatch = torch.tensor([(i % B) // 4 for i in range(W * B)])  # 3 mini-batches of 4 rows per rank
rows = slice(d.rank * B, (d.rank + 1) * B)
batch = pack_batch(prompts[rows], responses[rows], pad_id=1)
gid = torch.arange(W * B)[rows].float()
batch.advantages = gid  # [B]: which global row this is
batch.rollout_logprobs = -(gid[:, None] + torch.arange(batch.input_ids.shape[1]) / 100) * batch.loss_mask
before = int(batch.attention_mask.sum())
new, mb, rank_tokens = exchange(batch, minibatch[rows], pad_id=1, device=torch.device("cpu"))
ids = new.advantages.long().tolist()
ref = pack_batch([prompts[i] for i in ids], [responses[i] for i in ids], pad_id=1)
same = {k: bool(torch.equal(getattr(new, k), v)) for k, v in ref.fields().items()}
same["shapes"] = all(getattr(new, k).shape == v.shape for k, v in ref.fields().items())
expect = -(new.advantages[:, None] + torch.arange(new.input_ids.shape[1]) / 100) * ref.loss_mask
same["rollout_logprobs"] = bool(torch.equal(new.rollout_logprobs, expect))
same["minibatch"] = mb.tolist() == [int(minibatch[i]) for i in ids]
json.dump({"ids": ids, "same": same, "before": before, "after": int(new.attention_mask.sum()),
           "rank_tokens": rank_tokens, "keys": sorted(new.fields())}, open(out + f"/rank{d.rank}.json", "w"))
from fastpmd.train.distributed import shutdown_distributed
shutdown_distributed()  # no group left for interpreter finalization to tear down
'''

FIT_WORKER = '''
import sys
import torch, torch.distributed as dist
from fastpmd.train.cli import build_config
from fastpmd.train.distributed import init_distributed
from fastpmd.train.task.reward_functions import Scores
from fastpmd.train.trainer import Trainer

torch.set_num_threads(1)
out = sys.argv[2]  # argv: [tmp_path, out, *flags]
cfg, _ = build_config(["--out", out, "--prompts-per-step", "8", "--group-size", "4", "--mini-batches", "2",
                       "--warmup-steps", "0", "--max-steps", "2", "--max-new-tokens", "12", "--no-progress",
                       "--no-plots", "--set", "run.eval_every=0", "--set", "optim.micro_batch_tokens=48",
                       "--set", "optim.grad_clip=1e9", *sys.argv[3:]])
d = init_distributed("cpu")
tr = Trainer(cfg, d)
# an untrained model never answers right: score by the response's length parity instead, so the advantages (and
# the gradient) are not zero, the same in both runs for the same responses
def parity(problems, texts):
    rewards = torch.tensor([1.0 if len(t) % 2 else -1.0 for t in texts])
    return Scores(rewards, rewards[:, None], ["parity"])


tr.task.score = parity
tr.fit()
del tr  # the FSDP modules and their groups go before the groups are destroyed
from fastpmd.train.distributed import shutdown_distributed
shutdown_distributed()  # no group left for interpreter finalization to tear down
'''


def test_plan_owners_bounds_each_ranks_tokens_per_minibatch():
    rng = random.Random(0)
    for _ in range(300):
        world = rng.randint(1, 5)
        B = rng.randint(1, 12)
        lengths = [rng.randint(1, 60) for _ in range(world * B)]
        mb = [rng.randint(0, 2) for _ in range(world * B)]
        owners = plan_owners(lengths, mb, world)
        assert owners == plan_owners(lengths, mb, world) and all(0 <= o < world for o in owners)
        for j in set(mb):
            seqs = [i for i in range(world * B) if mb[i] == j]
            loads = [sum(lengths[i] for i in seqs if owners[i] == r) for r in range(world)]
            mean = sum(loads) / world
            assert max(loads) <= mean + max(lengths[i] for i in seqs) + 1e-9, (lengths, mb, owners)
            if len(seqs) >= world:  # every rank gets a sequence of each mini-batch it can
                assert min(loads) > 0
    assert plan_owners([5, 5, 5, 5], [0, 0, 0, 0], 1) == [0, 0, 0, 0]
    assert plan_owners([9, 1, 1, 1], [0, 0, 0, 0], 2) == [0, 1, 1, 1]  # 9 | 3, from 10 | 2
    with pytest.raises(ValueError, match="multiple of world"):
        plan_owners([1, 2, 3], [0, 0, 0], 2)


@pytest.mark.slow
def test_exchange_moves_whole_rows_and_evens_the_tokens(tmp_path):
    torchrun(EXCHANGE_WORKER, tmp_path, 2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert sorted(ranks[0]["ids"] + ranks[1]["ids"]) == list(range(24))  # every row once
    for r in ranks:
        assert all(r["same"].values()), r["same"]
        assert "rollout_logprobs" in r["keys"] and "advantages" in r["keys"]
    assert [r["after"] for r in ranks] == ranks[0]["rank_tokens"]
    before = [r["before"] for r in ranks]
    after = [r["after"] for r in ranks]
    assert sum(before) == sum(after)
    assert before[0] - before[1] > 60  # rank 0's responses are 9 tokens longer
    assert abs(after[0] - after[1]) <= 3 * 16  # per mini-batch within one sequence (<= 16 tokens), 3 of them
    assert any(i >= 12 for i in ranks[0]["ids"]) and any(i < 12 for i in ranks[1]["ids"])  # rows did move


def _fit(tmp_path, name, *flags):
    out = tmp_path / name
    torchrun(FIT_WORKER, tmp_path, 2, str(out), *flags, timeout=600)
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]


@pytest.mark.slow
def test_balanced_steps_train_like_unbalanced_ones(tmp_path):
    """Two RL steps on two processes: rows move (the token imbalance drops) but the rollouts, the loss and the
    gradient norm are those of the run whose rows stay put (equal up to summation order)."""
    on = _fit(tmp_path, "on")
    off = _fit(tmp_path, "off", "--set", "optim.balance_ranks=False")
    assert len(on) == len(off) == 2
    for a, b in zip(on, off):
        for key in ("reward_mean", "response_len_mean"):
            assert a[key] == b[key], key
        for key in ("loss", "grad_norm", "logratio_mean", "entropy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
        assert 0 <= a["rank_tokens_imbalance"] <= b["rank_tokens_imbalance"]
    assert sum(b["rank_tokens_imbalance"] for b in off) > 0  # the two ranks' rollouts differ in length
    assert all(abs(a["loss"]) > 1e-4 and a["grad_norm"] > 1e-3 for a in on)  # a gradient to compare


def test_rank_balance_bench_plans_more_even_updates(tmp_path):
    """bench/rank_balance.py's cost model on a small batch: moving rows never plans a slower update and the
    efficiency stays in (0, 1]; the tables are written."""
    from fastpmd.bench import rank_balance as rb

    lengths = rb.synthetic_lengths(32, 4, seed=0, median=300, max_new=1024)
    stay = rb.plan_cost(lengths, 4, 2, 2048, balance=False, attn=0.0)
    moved = rb.plan_cost(lengths, 4, 2, 2048, balance=True, attn=0.0)
    assert 0 < stay["efficiency"] < moved["efficiency"] <= 1.0
    assert moved["rank_tokens_max_per_minibatch"] < stay["rank_tokens_max_per_minibatch"]
    assert max(lengths) <= 400 + 1024 and min(lengths) >= 61
