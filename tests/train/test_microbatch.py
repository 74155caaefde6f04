"""Token-budget micro-batches (`optim.micro_batch_tokens`): the planner's bins, and through the trainer's own
accumulation the gradient equals one big batch's, for every loss, on 1 process and on 2 gloo processes whose
sequences differ in length (so their first-fit counts differ and the shorter rank spreads over more
micro-batches), with an empty (zero-weight) micro-batch inserted too, and with the sequences moved between the
ranks first (`rank_balance.balance`: then the ranks hold different numbers of sequences)."""
import json
import random

import pytest
import torch
from train_helpers import torchrun, trainer_worker

from fastpmd.train.microbatch import first_fit_decreasing, pack_micro_batches

WORKER = trainer_worker([], '''
    from fastpmd.train import rank_balance
    # the second half of the prompts (rank 1 of 2) has much longer responses
    lens = [int(torch.randint(1, 4, (1,), generator=g)) + (8 if i >= P * n // 2 else 0) for i in range(P * n)]
    responses = [torch.randint(3, 19, (k,), generator=g).tolist() + [2] for k in lens]
    rewards = (torch.rand(P * n, generator=g) > 0.5).float()
    lo, hi = d.rank * P // W, (d.rank + 1) * P // W
    mine = slice(lo * n, hi * n)
    idx = torch.arange((hi - lo) * n)
    batch = pack_batch([p for p in prompts[lo:hi] for _ in range(n)], responses[mine], 0)

    def grads_of(tokens, insert_empty=False, balanced=False):
        tr.cfg.optim.micro_batch_tokens, tr.cfg.optim.micro_batch_seqs = tokens, 1000
        b, i = batch, idx
        if balanced and W > 1:  # rows moved between the ranks first (train/rank_balance.py): unequal counts
            b, (i,) = rank_balance.balance(batch, [idx], tr.tok.pad_id, d.device)
        plan = tr.micro_batches(b, i)
        if insert_empty:  # rank 0: an empty micro-batch in the middle; rank 1: at the end (the root's last)
            plan.insert(1 if d.rank == 0 else len(plan), i[:0])
        orig = tr.micro_batches
        tr.micro_batches = lambda b, i: plan
        stats = tr.accumulate_gradients(b, i)
        tr.micro_batches = orig
        grads = {k: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).tolist()
                 for k, p in tr.policy.named_parameters()}
        tr.optimizer.zero_grad(set_to_none=True)
        loss = stats["loss"].reshape(1).clone()
        dist.all_reduce(loss)
        return {"loss": loss.item() / W, "grads": grads, "plan": [m.tolist() for m in plan],
                "tokens_max": stats["micro_batch_tokens_max"]}

    results = {}
    tr.cfg.optim.micro_batch_tokens = 0
    base_logp, _ = tr.old_logprobs(batch)
    tr.cfg.optim.micro_batch_tokens = 30
    tok_logp, _ = tr.old_logprobs(batch)
    results["old_logprobs_equal"] = bool(torch.allclose(tok_logp, base_logp, rtol=0, atol=1e-6))
    for name, loss_type in [("pmd-mean", "grpo"), ("grpo", "grpo"), ("grpo", "dapo"), ("gspo", "grpo"),
                            ("pg", "grpo")]:
        tr.cfg.loss = dataclasses.replace(tr.cfg.loss, name=name, loss_type=loss_type)
        tr.loss_cfg = loss_config(tr.cfg)
        shift = 0.05 * ((batch.targets % 3) - 1).float() * batch.loss_mask
        batch.old_logprobs = base_logp + shift
        batch.advantages = fastpmd.advantages_for(tr.loss_cfg, rewards, n)[mine]
        results[f"{name}/{loss_type}"] = {"big": grads_of(0), "tokens": grads_of(30),
                                          "empty": grads_of(30, insert_empty=True),
                                          "balanced": grads_of(30, balanced=True)}
    local = torch.tensor([len(tr.micro_batches(batch, idx))])
    counts = [torch.zeros(1, dtype=torch.long) for _ in range(W)]
    dist.all_gather(counts, local)
    results["counts"] = [int(c) for c in counts]
    results["lengths"] = batch.attention_mask.sum(1).tolist()
    json.dump(results, open(out + f"/rank{d.rank}_world{W}.json", "w"))
    del tr  # the FSDP modules and their groups go before the groups are destroyed
    from fastpmd.train.distributed import shutdown_distributed
    shutdown_distributed()  # no group left for interpreter finalization to tear down
''')


def test_first_fit_decreasing_respects_the_budget():
    lengths = [5, 9, 3, 12, 7, 2, 2, 8]
    bins = first_fit_decreasing(lengths, 12)
    assert sorted(i for b in bins for i in b) == list(range(8))
    assert all(sum(lengths[i] for i in b) <= 12 for b in bins)
    assert len(bins) == 4  # 48 tokens in 4 full bins: 12 | 9+3 | 8+2+2 | 7+5
    assert first_fit_decreasing([20, 3], 10) == [[0], [1]]  # an over-long sequence alone


def test_pack_micro_batches_balances_into_the_given_count():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 30))]
        budget = rng.randint(10, 80)
        need = len(pack_micro_batches(lengths, budget))
        for m in (need, need + 1, need + 3):
            bins = pack_micro_batches(lengths, budget, m)
            assert len(bins) == m and sorted(i for b in bins for i in b) == list(range(len(lengths)))
            assert all(sum(lengths[i] for i in b) <= budget or len(b) == 1 for b in bins)
    # balanced: 8 sequences of 10 tokens into 4 micro-batches of 20, not 3 full ones and an empty one
    assert [len(b) for b in pack_micro_batches([10] * 8, 30, 4)] == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="num_bins"):
        pack_micro_batches([10] * 8, 10, 4)
    with pytest.raises(ValueError, match="budget"):
        pack_micro_batches([1], 0)


def _run(tmp_path, world):
    torchrun(WORKER, tmp_path, world)
    return [json.loads((tmp_path / f"rank{r}_world{world}.json").read_text()) for r in range(world)]


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_token_budget_gradient_equals_one_big_batch(tmp_path, world):
    ranks = _run(tmp_path, world)
    r0 = ranks[0]
    assert len(set(r0["counts"])) == 1 and r0["counts"][0] > 1  # the same number of micro-batches everywhere
    for res in ranks:
        assert res["old_logprobs_equal"]
        lengths = res["lengths"]
        for key in ("pmd-mean/grpo", "grpo/grpo", "grpo/dapo", "gspo/grpo", "pg/grpo"):
            plan = res[key]["tokens"]["plan"]
            assert sorted(i for m in plan for i in m) == list(range(len(lengths)))
            assert all(sum(lengths[i] for i in m) <= 30 or len(m) == 1 for m in plan)
            assert res[key]["tokens"]["tokens_max"] <= max(30, max(lengths))
    if world == 2:  # rank 0's short sequences alone would need fewer micro-batches than rank 1's long ones
        short = ranks[0]["lengths"]
        assert len(pack_micro_batches(short, 30)) < r0["counts"][0]
    for key in ("pmd-mean/grpo", "grpo/grpo", "grpo/dapo", "gspo/grpo", "pg/grpo"):
        big = r0[key]["big"]
        norm = sum(float(torch.tensor(g).square().sum()) for g in big["grads"].values())
        assert norm > 0, key
        for mode in ("tokens", "empty", "balanced"):
            got = r0[key][mode]
            assert got["loss"] == pytest.approx(big["loss"], rel=1e-5, abs=1e-7), (key, mode)
            for name, g in big["grads"].items():
                torch.testing.assert_close(torch.tensor(got["grads"][name]), torch.tensor(g), rtol=1e-4, atol=1e-6,
                                           msg=f"{key} {mode} {name}")
