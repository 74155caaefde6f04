"""fastpmd's cispo / sapo / luspo losses (fastpmd/losses_trl.py, registry entries) against the installed TRL's
GRPOTrainer._compute_loss itself with loss_type set to the same name: values and gradients, with TRL's vLLM
importance weights and entropy mask; and no inf/NaN from finite input."""
import pytest
import torch

import fastpmd
from fastpmd.losses_trl import cispo_loss, luspo_loss, sapo_loss

from test_losses_vs_trl import random_batch, trl_loss

OPTIONS = ["none", "is_weights", "entropy_mask"]
CASES = [("cispo", "token"), ("sapo", "token"), ("sapo", "sequence"), ("luspo", "sequence"), ("luspo", "token")]


def ours(loss_type, level, logp, old, adv, mask, *, eps, weights, emask):
    kw = dict(weights=weights, entropy_mask=emask)
    if loss_type == "cispo":
        return cispo_loss(logp, old, adv, mask, epsilon_high=eps[1], num_items=mask.sum(), **kw)
    if loss_type == "sapo":
        return sapo_loss(logp, old, adv, mask, temperature_pos=0.9, temperature_neg=1.3,
                         importance_sampling_level=level, **kw)
    return luspo_loss(logp, old, adv, mask, epsilon_low=eps[0], epsilon_high=eps[1], importance_sampling_level=level,
                      **kw)


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("loss_type,level", CASES)
def test_equals_trl_compute_loss(loss_type, level, option):
    logp, old, ref, mask, adv, ent, is_ratio = random_batch(hash((loss_type, level, option)) % 1000, B=6, K=9)
    eps = {"cispo": (0.2, 1.05), "sapo": (0.2, 0.28), "luspo": (0.05, 0.08)}[loss_type]  # some ratios clip
    sapo = {"sapo_temperature_pos": 0.9, "sapo_temperature_neg": 1.3}
    want, emask = trl_loss(logp, old, adv, mask, ent, loss_type=loss_type, level=level, beta=0.0, ref=ref,
                           option=option, is_ratio=is_ratio, eps=eps, args=sapo)
    got, metrics = ours(loss_type, level, logp, old, adv, mask, eps=eps, emask=emask,
                        weights=is_ratio if option == "is_weights" else None)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    g1, = torch.autograd.grad(got, logp)
    g2, = torch.autograd.grad(want, logp)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-14)
    assert g1.abs().sum() > 0 and torch.isfinite(metrics["logratio_mean"])
    if loss_type == "cispo":
        assert 0 < metrics["cispo_clip_ratio"] < 1  # the case exercises the clamp


@pytest.mark.parametrize("name", ["cispo", "sapo", "luspo"])
def test_finite_at_huge_log_ratio(name):
    # float32: exp(99) overflows; masked positions hold -inf old log-probs; A = 0 (equal rewards) as in the
    # issue's grpo case (luspo's unclipped A < 0 branch is the exact, overflowing -ratio * A)
    m = torch.tensor([[True, True, False], [True, False, False]])
    logp = torch.full((2, 3), -1.0, requires_grad=True)
    old = torch.tensor([[-100.0, -1.0, float("-inf")], [-100.0, float("-inf"), 0.0]])
    loss, met = fastpmd.compute_loss(fastpmd.LossConfig(name=name), logp, old, torch.tensor([1.0, 0.0]), m)
    (g,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    if name != "luspo":  # luspo logs grpo_loss's metrics: its ratio_mean is the exact (overflowing) exp(99)
        assert all(torch.isfinite(v) for v in met.values()), met
    assert (g[~m] == 0).all()


def test_registry_entries_and_option_errors():
    from fastpmd.registry import LOSSES, NORMALISERS

    for name in ("cispo", "sapo", "luspo"):
        assert name in fastpmd.LOSS_NAMES
    for name, spec in LOSSES.items():
        for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
            assert spec.normaliser_of(fastpmd.LossConfig(name=name, loss_type=loss_type)) in NORMALISERS, name
        assert spec.weights in ("sequence", "token", None) and spec.estimators, name
    logp, old, ref, mask, adv, ent, is_ratio = random_batch(3)
    with pytest.raises(ValueError, match="epsilon_high"):
        cispo_loss(logp, old, adv, mask, epsilon_high=0.0)
    with pytest.raises(ValueError, match="temperature_neg"):
        sapo_loss(logp, old, adv, mask, temperature_neg=-1.0)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        sapo_loss(logp, old, adv, mask, importance_sampling_level="tok")
    with pytest.raises(ValueError, match="options"):
        fastpmd.LossConfig(name="sapo", options={"temperature": 1.0})  # not a keyword of sapo_loss
    cfg = fastpmd.LossConfig(name="sapo", options={"temperature_pos": 0.9, "temperature_neg": 1.3})
    got = fastpmd.compute_loss(cfg, logp, old, adv, mask)[0]
    torch.testing.assert_close(got, sapo_loss(logp, old, adv, mask, temperature_pos=0.9, temperature_neg=1.3)[0])
