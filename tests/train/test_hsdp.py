"""HSDP (`parallel.dp_replicate`): a 2 x 2 mesh (2 replicas, each sharded over 2 gloo ranks) gives the same loss
and gradient norm as FSDP over 4 ranks on a fixed batch, through the trainer's own accumulation."""
import json

import pytest
from train_helpers import torchrun, trainer_worker

BODY = '''
    responses = [torch.randint(3, 19, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist() + [2]
                 for _ in range(P * n)]
    rewards = (torch.rand(P * n, generator=g) > 0.5).float()
    lo, hi = d.rank * P // W, (d.rank + 1) * P // W
    mine = slice(lo * n, hi * n)
    batch = pack_batch([p for p in prompts[lo:hi] for _ in range(n)], responses[mine], 0)
    logp, _ = tr.old_logprobs(batch)
    shift = 0.05 * ((batch.targets % 3) - 1).float() * batch.loss_mask
    batch.old_logprobs, batch.advantages = logp + shift, fastpmd.advantages_for(tr.loss_cfg, rewards, n)[mine]
    stats = tr.accumulate_gradients(batch, torch.arange((hi - lo) * n))
    loss = stats["loss"].reshape(1).clone()
    dist.all_reduce(loss)
    norm = torch.nn.utils.clip_grad_norm_(tr.policy.parameters(), 1e9)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    mesh = next(tr.policy.parameters()).device_mesh
    if d.rank == 0:
        json.dump({"loss": loss.item() / W, "norm": norm.item(), "mesh": list(mesh.shape)},
                  open(out + "/result.json", "w"))
    del tr  # the FSDP modules and their groups go before the groups are destroyed
    from fastpmd.train.distributed import shutdown_distributed
    shutdown_distributed()  # no group left for interpreter finalization to tear down
'''


@pytest.mark.slow
def test_hsdp_2x2_matches_fsdp_over_4(tmp_path):
    res = {}
    for r in (1, 2):
        d = tmp_path / f"r{r}"
        d.mkdir()
        torchrun(trainer_worker(["--micro-batch-seqs", "3", "--set", f"parallel.dp_replicate={r}"], BODY), d, 4,
                 timeout=280)
        res[r] = json.loads((d / "result.json").read_text())
    assert res[1]["mesh"] == [4] and res[2]["mesh"] == [2, 2]
    assert res[2]["loss"] == pytest.approx(res[1]["loss"], rel=1e-6, abs=1e-7)
    assert res[2]["norm"] == pytest.approx(res[1]["norm"], rel=1e-5)
