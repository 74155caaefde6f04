"""FSDP2 over two gloo processes gives the same loss and gradients as one process on a fixed batch (fp32 tiny
model), through the trainer's own accumulation and normalisation (uneven micro-batches included); and the number
of FSDP collectives per optimizer step."""
import json

import pytest
import torch
from train_helpers import torchrun, trainer_worker

WORKER = trainer_worker(["--micro-batch-seqs", "5"], '''
    responses = [torch.randint(3, 19, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist() + [2]
                 for _ in range(P * n)]
    rewards = (torch.rand(P * n, generator=g) > 0.5).float()
    lo, hi = d.rank * P // W, (d.rank + 1) * P // W  # this rank's prompts
    mine = slice(lo * n, hi * n)
    results = {}
    for name, loss_type in [("pmd-mean", "grpo"), ("grpo", "grpo"), ("grpo", "dapo"), ("pg", "grpo")]:
        tr.cfg.loss = dataclasses.replace(tr.cfg.loss, name=name, loss_type=loss_type)
        tr.loss_cfg = loss_config(tr.cfg)
        batch = pack_batch([p for p in prompts[lo:hi] for _ in range(n)], responses[mine], 0)
        logp, _ = tr.old_logprobs(batch)
        shift = 0.05 * ((batch.targets % 3) - 1).float() * batch.loss_mask  # Delta != 0, same per token
        batch.old_logprobs, batch.advantages = logp + shift, fastpmd.advantages_for(tr.loss_cfg, rewards, n)[mine]
        stats = tr.accumulate_gradients(batch, torch.arange((hi - lo) * n))
        loss = stats["loss"].reshape(1).clone()
        dist.all_reduce(loss)
        grads = {k: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).tolist()
                 for k, p in tr.policy.named_parameters()}
        tr.optimizer.zero_grad(set_to_none=True)
        results[f"{name}/{loss_type}"] = {"loss": loss.item() / W, "grads": grads}
    # collectives of one optimizer step's accumulation (2 blocks, micro-batches of 5 sequences)
    import collections
    import torch.distributed.fsdp._fully_shard._fsdp_collectives as fc
    calls = collections.Counter()
    for cls, key in [(fc.DefaultAllGather, "all_gather"), (fc.DefaultReduceScatter, "reduce_scatter")]:
        def counted(self, *a, _orig=cls.__call__, _key=key, **k):
            calls[_key] += 1
            return _orig(self, *a, **k)
        cls.__call__ = counted
    idx = torch.arange((hi - lo) * n)
    tr.accumulate_gradients(batch, idx)
    results["collectives"] = {**calls, "micro_batches": len(idx.split(5)), "blocks": len(tr.hf.model.layers)}
    if d.rank == 0:
        json.dump(results, open(out + f"/world{W}.json", "w"))
    del tr  # the FSDP modules and their groups go before the groups are destroyed
    from fastpmd.train.distributed import shutdown_distributed
    shutdown_distributed()  # no group left for interpreter finalization to tear down
''')


def _run(tmp_path, world):
    torchrun(WORKER, tmp_path, world, timeout=240)
    return json.loads((tmp_path / f"world{world}.json").read_text())


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path):
    one, two = _run(tmp_path, 1), _run(tmp_path, 2)
    # FSDP2 over 2 ranks: the root (embeddings, norm, LM head) is gathered and reduce-scattered once per optimizer
    # step, across all micro-batches and loss chunks; each block is gathered for forward and again for backward
    # (the last block stays gathered) and reduce-scattered once per micro-batch.
    c = two.pop("collectives")
    one.pop("collectives")
    m, blocks = c["micro_batches"], c["blocks"]
    assert m == 4 and blocks == 2
    assert c["all_gather"] == 1 + m * (2 * blocks - 1)
    assert c["reduce_scatter"] == 1 + m * blocks
    for key in one:
        assert two[key]["loss"] == pytest.approx(one[key]["loss"], rel=1e-5, abs=1e-7), key
        assert one[key]["grads"].keys() == two[key]["grads"].keys()
        norm = 0.0
        for name, g1 in one[key]["grads"].items():
            a, b = torch.tensor(g1), torch.tensor(two[key]["grads"][name])
            norm += float(a.square().sum())
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=f"{key} {name}")
        assert norm > 0, key  # the batch really produced a gradient
