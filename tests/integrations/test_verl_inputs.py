"""verl integration, issue 24: every loss_agg_mode of verl 0.9.1 (token-sum included) equals verl's own agg_loss,
and FASTPMD_PMD_TAU / pmd_tau errors name their source, FASTPMD_PMD_TAU checked when register() runs."""
import pytest
import torch

pytest.importorskip("verl.trainer.ppo.core_algos")
from omegaconf import OmegaConf  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402

import fastpmd.integrations.verl as fv  # noqa: E402


def _batch(B=6, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.long)
    for i in range(B):
        mask[i, int(torch.randint(1, T + 1, (1,), generator=g)):] = 0
    adv_seq = torch.randn(B, generator=g, dtype=torch.float64)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    new = (old + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)).requires_grad_()
    return old, new, adv_seq[:, None] * mask, mask, adv_seq


@pytest.mark.parametrize("mode", fv.AGG_MODES)
@pytest.mark.parametrize("info", [{}, {"dp_size": 2, "global_batch_size": 12, "batch_num_tokens": 40,
                                      "loss_scale_factor": 5}])
def test_every_agg_mode_equals_verl_agg_loss(mode, info):
    """Sequence i's PMD term (A_i - tau*Delta_i)^2 / (2 tau), spread evenly over its tokens, through verl's agg_loss."""
    old, new, adv_tok, mask, adv_seq = _batch()
    tau = 0.05
    cfg = OmegaConf.create({"pmd_tau": tau, "global_batch_info": info})
    loss, _ = core_algos.get_policy_loss_fn("pmd_mean")(old, new, adv_tok, mask, mode, cfg)
    m = mask.bool()
    term = (adv_seq - tau * torch.where(m, new - old, 0.0).sum(-1)) ** 2 / (2 * tau)  # [B]
    loss_mat = (term / mask.sum(-1))[:, None].expand_as(new)
    want = core_algos.agg_loss(loss_mat, mask, mode, dp_size=info.get("dp_size", 1),
                               batch_num_tokens=info.get("batch_num_tokens"),
                               global_batch_size=info.get("global_batch_size"),
                               loss_scale_factor=info.get("loss_scale_factor"))
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    g1, = torch.autograd.grad(loss, new)
    g2, = torch.autograd.grad(want, new)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-14)


def test_unknown_agg_mode_lists_the_supported_ones():
    old, new, adv_tok, mask, _ = _batch()
    with pytest.raises(ValueError, match="token-sum"):
        core_algos.get_policy_loss_fn("pmd_part")(old, new, adv_tok, mask, "token-avg", OmegaConf.create({}))


@pytest.mark.parametrize("raw", ["abc", "0,01", "1e-9", "nan", "-1"])
def test_bad_env_tau_named_at_register(raw, monkeypatch):
    monkeypatch.setenv("FASTPMD_PMD_TAU", raw)
    with pytest.raises(ValueError, match="FASTPMD_PMD_TAU"):
        fv.register()
    with pytest.raises(ValueError, match="FASTPMD_PMD_TAU"):
        fv.pmd_tau(OmegaConf.create({}))


def test_env_and_config_tau(monkeypatch):
    monkeypatch.setenv("FASTPMD_PMD_TAU", " 0.02 ")
    fv.register()
    assert fv.pmd_tau(OmegaConf.create({})) == 0.02
    assert fv.pmd_tau(OmegaConf.create({"policy_loss": {"pmd_tau": "0.03"}})) == 0.03
    for bad in ("abc", 1e-9):
        with pytest.raises(ValueError, match="pmd_tau"):
            fv.pmd_tau(OmegaConf.create({"policy_loss": {"pmd_tau": bad}}))
    with pytest.raises(ValueError, match="pmd_tau"):
        fv.register(pmd_tau=1e-9)

