"""PMDTrainer (fastpmd.integrations.trl): PMD-mean / PMD-part inside TRL's GRPOTrainer loop, on the fused loss."""
import copy
import math

import pytest
import torch

pytest.importorskip("trl")
import trl_tiny  # noqa: E402

import fastpmd  # noqa: E402
from fastpmd.integrations.trl import PMDConfig, PMDTrainer  # noqa: E402


def make_trainer(tmp_path, reward=trl_tiny.count_threes, **kw):
    args = trl_tiny.grpo_args(tmp_path, cls=PMDConfig, **kw)
    return PMDTrainer(model=trl_tiny.qwen2(), reward_funcs=reward, args=args, train_dataset=trl_tiny.dataset(),
                      processing_class=trl_tiny.tokenizer())


def fixed_batch(B=4, P=3, K=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, 14, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, 0] = 0  # left padding
    completion_ids = torch.randint(1, 14, (B, K), generator=g)
    completion_mask = torch.ones(B, K, dtype=torch.long)
    completion_mask[1, 3:] = 0
    completion_mask[2, 1:] = 0
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "advantages": torch.randn(B, generator=g),
            "num_items_in_batch": completion_mask.sum()}


def full_logit_logprobs(model, batch, temperature):
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    am = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    K = batch["completion_ids"].shape[1]
    logits = model(input_ids=ids, attention_mask=am).logits[:, -K - 1:-1] / temperature
    return logits.log_softmax(-1).gather(-1, batch["completion_ids"][..., None])[..., 0]


@pytest.mark.parametrize("length_norm", [True, 7.0])
@pytest.mark.parametrize("stale", [True, False])
def test_pmd_trainer_loss_equals_pmd_loss(tmp_path, stale, length_norm):
    tr = make_trainer(tmp_path, tau=0.3, length_norm=length_norm, temperature=0.9)
    batch = fixed_batch()
    mask = batch["completion_mask"].bool()
    if stale:
        batch["old_per_token_logps"] = torch.where(mask, -2.5 + 0.3 * torch.randn(mask.shape), 0.0)
    loss = tr._compute_loss(tr.model, batch)
    (g_got,) = torch.autograd.grad(loss, tr.model.lm_head.weight)
    logp = full_logit_logprobs(tr.model, batch, 0.9)
    old = batch["old_per_token_logps"] if stale else logp.detach()
    want, _ = fastpmd.pmd_loss(logp, old, batch["advantages"], mask, tau=0.3, length_norm=length_norm)
    (g_want,) = torch.autograd.grad(want, tr.model.lm_head.weight)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)
    assert tr._metrics["train"]["pmd/logratio_max"]


@pytest.mark.parametrize("estimator", ["mean", "loo", "partition", "partition_loo"])
def test_pmd_trainer_advantages_from_raw_group_rewards(tmp_path, estimator):
    seen = []

    def reward(completions, **kwargs):
        r = [float(len(c.split())) + 0.5 * c.split().count("3") for c in completions]
        seen.extend(r)
        return r

    tr = make_trainer(tmp_path, reward=reward, pmd_estimator=estimator, tau=0.5)
    prompts = [{"prompt": p} for p in ("1 + 2 =", "3 + 0 =") for _ in range(4)]
    out = tr._generate_and_score_completions(prompts)
    want = fastpmd.advantages(torch.tensor(seen), group_size=4, estimator=estimator, tau=0.5)
    torch.testing.assert_close(out["advantages"], want)
    assert torch.tensor(seen).std() > 0


def test_pmd_config_rejects_grpo_options(tmp_path):
    with pytest.raises(ValueError, match="pmd_estimator"):
        trl_tiny.grpo_args(tmp_path, cls=PMDConfig, pmd_estimator="grpo")
    with pytest.raises(ValueError, match="beta"):
        trl_tiny.grpo_args(tmp_path, cls=PMDConfig, beta=0.04)
    with pytest.raises(ValueError, match="tau"):
        trl_tiny.grpo_args(tmp_path, cls=PMDConfig, tau=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["mean", "partition"])
def test_pmd_trainer_trains_on_cpu(tmp_path, estimator):
    model = trl_tiny.qwen2()
    before = copy.deepcopy(model.state_dict())
    args = trl_tiny.grpo_args(tmp_path, cls=PMDConfig, tau=0.1, pmd_estimator=estimator, num_iterations=2,
                              max_steps=4)
    tr, logs = trl_tiny.train(PMDTrainer, args, model)
    losses = [h["loss"] for h in logs]
    assert all(math.isfinite(x) for x in losses) and len(set(losses)) > 1
    assert all(math.isfinite(h["grad_norm"]) for h in logs) and max(h["grad_norm"] for h in logs) > 0
    assert any(h["pmd/logratio_max"] != 0 for h in logs[1::2])  # stale iterations see pi_theta != pi_t
    assert all(h["pmd/logratio_min"] <= h["pmd/logratio_mean"] <= h["pmd/logratio_max"] for h in logs)
    assert "pmd/residual_abs_mean" in logs[0]
    after = tr.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
