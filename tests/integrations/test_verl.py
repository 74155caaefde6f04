"""fastpmd.integrations.verl through verl's own registries, against the released OpenKimi PMD loss formula."""
import numpy as np
import pytest
import torch

pytest.importorskip("verl.trainer.ppo.core_algos")
from omegaconf import OmegaConf  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402

import fastpmd  # noqa: E402
import fastpmd.integrations.verl as fv  # noqa: E402


def released_loss(old, new, adv_tok, mask, tau, mode):
    """The released loss (PMD_NOTES "Released loss"): mean_i (A_i - tau*Delta_i)^2 / (2 tau) / |y_i|, or / max length."""
    m = mask.double()
    lengths = m.sum(-1).clamp(min=1)
    delta = ((new - old) * m).sum(-1)
    a = (adv_tok * m).sum(-1) / lengths
    per_seq = (a - tau * delta) ** 2 / (2 * tau)
    if mode == "seq-mean-token-mean":
        return (per_seq / lengths).mean()
    return per_seq.mean() / mask.shape[1]  # seq-mean-token-sum-norm


def verl_batch(seed, B=8, T=9, n=4):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.long)
    for i in range(B):
        mask[i, int(torch.randint(1, T + 1, (1,), generator=g)):] = 0
    rewards = torch.randint(0, 2, (B,), generator=g).double() + 0.1 * torch.randn(B, generator=g, dtype=torch.float64)
    token_rewards = torch.zeros(B, T, dtype=torch.float64)
    token_rewards[torch.arange(B), mask.sum(-1) - 1] = rewards  # verl puts the score on the last response token
    index = np.repeat(np.arange(B // n), n).astype(object)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    new = (old + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)).requires_grad_()
    return old, new, token_rewards, mask, index, rewards


@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("name", fv.LOSS_NAMES)
def test_pmd_loss_in_verl_registry_equals_released(name, mode):
    old, new, token_rewards, mask, index, rewards = verl_batch(0)
    adv_tok, _ = core_algos.get_adv_estimator_fn("rloo")(token_level_rewards=token_rewards, response_mask=mask,
                                                         index=index)  # verl's own RLOO (the released setting)
    cfg = OmegaConf.create({"policy_loss": {"loss_mode": name, "pmd_tau": 0.07}, "global_batch_info": {}})
    loss, metrics = core_algos.get_policy_loss_fn(name)(old, new, adv_tok, mask, mode, cfg)
    want = released_loss(old, new, adv_tok, mask, 0.07, mode)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    g1, = torch.autograd.grad(loss, new)
    g2, = torch.autograd.grad(want, new)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-14)
    assert metrics["actor/pmd_logratio_min"] <= metrics["actor/pmd_logratio_max"]
    # verl's rloo is fastpmd's "loo" estimator
    loo = fastpmd.advantages(rewards, group_size=4, estimator="loo")
    torch.testing.assert_close(adv_tok[:, 0], loo)


def test_global_batch_info_gives_global_normalisers():
    old, new, token_rewards, mask, index, _ = verl_batch(1)
    adv_tok, _ = core_algos.get_adv_estimator_fn("rloo")(token_level_rewards=token_rewards, response_mask=mask,
                                                         index=index)
    fn = core_algos.get_policy_loss_fn("pmd_mean")
    whole = fn(old, new, adv_tok, mask, "seq-mean-token-mean", OmegaConf.create({"pmd_tau": 0.1}))[0]
    parts = sum(fn(old[i:i + 4], new[i:i + 4], adv_tok[i:i + 4], mask[i:i + 4], "seq-mean-token-mean",
                   OmegaConf.create({"pmd_tau": 0.1, "global_batch_info": {"dp_size": 2, "global_batch_size": 8}}))[0]
                for i in (0, 4)) / 2  # two ranks, gradients averaged by DP
    torch.testing.assert_close(parts, whole)
    tok = fn(old, new, adv_tok, mask, "token-mean", OmegaConf.create({"pmd_tau": 0.1}))[0]
    m = mask.bool()
    a = (adv_tok * mask).sum(-1) / mask.sum(-1)
    d = torch.where(m, new - old, 0.0).sum(-1)
    torch.testing.assert_close(tok, ((a - 0.1 * d) ** 2 / 0.2).sum() / mask.sum())


@pytest.mark.parametrize("name,estimator", list(fv.ESTIMATOR_NAMES.items()))
def test_partition_estimators_in_verl_registry(name, estimator):
    _, _, token_rewards, mask, _, rewards = verl_batch(2)
    index = np.array(["b", "a", "b", "a", "c", "c", "b", "a"], dtype=object)  # uids need not be consecutive
    adv, _ = core_algos.get_adv_estimator_fn(name)(token_level_rewards=token_rewards, response_mask=mask,
                                                   index=index, config=OmegaConf.create({"pmd_tau": 0.3}))
    for uid in ("a", "b", "c"):
        rows = torch.tensor([i for i, u in enumerate(index) if u == uid])
        want = fastpmd.advantages(rewards[rows], group_size=len(rows), estimator=estimator, tau=0.3)
        torch.testing.assert_close(adv[rows, 0], want)
    assert torch.equal(adv == 0, (mask == 0) | (adv == 0))


def test_verl_config_errors():
    old, new, token_rewards, mask, index, _ = verl_batch(3)
    fn = core_algos.get_policy_loss_fn("pmd_mean")
    with pytest.raises(ValueError, match="loss_agg_mode"):
        fn(old, new, token_rewards, mask, "token-avg", OmegaConf.create({}))
    with pytest.raises(ValueError, match="pmd_tau"):
        fn(old, new, token_rewards, mask, "seq-mean-token-mean", OmegaConf.create({"pmd_tau": -1.0}))
    with pytest.raises(ValueError, match="importance"):
        fn(old, new, token_rewards, mask, "seq-mean-token-mean", None, torch.ones_like(old))


def test_fastpmd_head_answers_verl_fused_forward():
    from verl.models.transformers.dense_common import forward_with_torch_backend

    import trl_tiny

    model = trl_tiny.qwen2()
    ids = torch.randint(3, 14, (1, 11))  # verl's packed layout: one row, position ids restart per sequence
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4]])
    want = forward_with_torch_backend(model, input_ids=ids, position_ids=pos, temperature=0.8, return_dict=True)
    (gw,) = torch.autograd.grad(want.log_probs.sum() + want.entropy.sum(), model.lm_head.weight)
    fv.use_fastpmd_head(model)
    got = model(input_ids=ids, position_ids=pos, temperature=0.8, return_dict=True)
    (gg,) = torch.autograd.grad(got.log_probs.sum() + got.entropy.sum(), model.lm_head.weight)
    torch.testing.assert_close(got.log_probs, want.log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.entropy, want.entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gg, gw, rtol=1e-4, atol=1e-5)
    assert (want.log_probs < 0).all() and gw.abs().sum() > 0
