"""fastpmd/registry.py: a user's loss by import path (module or file) is the function it names, with
LossConfig.options as keywords; every bad name, path or option is a ValueError naming its field."""
import pytest
import torch

import fastpmd


def batch():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(3, 4, generator=g, dtype=torch.float64)
    return logp, logp - 0.1, torch.randn(3, generator=g, dtype=torch.float64), torch.rand(3, 4, generator=g) > 0.3


def test_user_loss_by_module_and_by_file(tmp_path):
    logp, old, adv, mask = batch()
    cfg = fastpmd.LossConfig(name="fastpmd.losses:pg_loss", options={"length_norm": False})
    assert cfg.advantage_estimator == "grpo" and cfg.spec.weights is None and cfg.spec.normaliser_of(cfg) == "batch"
    got, _ = fastpmd.compute_loss(cfg, logp, old, adv, mask)
    torch.testing.assert_close(got, fastpmd.pg_loss(logp, old, adv, mask, length_norm=False)[0], rtol=0, atol=0)
    (tmp_path / "scaled.py").write_text("def loss(lp, old, adv, mask, *, k=1.0):\n"
                                        "    return k * (lp * mask).sum(), {'loss': k * (lp * mask).sum()}\n")
    got, met = fastpmd.compute_loss(fastpmd.LossConfig(name=f"{tmp_path}/scaled.py:loss", options={"k": 3.0}),
                                    logp, old, adv, mask)
    torch.testing.assert_close(got, 3.0 * (logp * mask).sum())


@pytest.mark.parametrize("kw,match", [
    ({"name": "ppo"}, "name must be one of"),
    ({"name": "nosuchmodule_xyz:fn"}, "name 'nosuchmodule_xyz:fn': cannot import"),
    ({"name": "fastpmd.losses:missing"}, "has no function 'missing'"),
    ({"name": "missing_file.py:fn"}, "cannot import 'missing_file.py'"),
    ({"name": "fastpmd.losses:"}, "name must be 'file.py:function'"),
    ({"name": "fastpmd.losses:pg_loss", "rollout_correction": "tis"}, "rollout_correction"),
    ({"name": "pmd-mean", "options": {"tau": 0.5}}, "options 'tau' is set by the loss config"),
    ({"name": "grpo", "options": {"num_items": 3}}, "options 'num_items' is set"),
    ({"name": "pg", "options": {"scale": 2}}, "options 'scale' is not a keyword option of pg_loss"),
    ({"name": "pg", "options": [1]}, "options must be a dict"),
])
def test_bad_names_and_options(kw, match):
    with pytest.raises(ValueError, match=match):
        fastpmd.LossConfig(**kw)


def test_weights_only_where_the_entry_takes_them():
    logp, old, adv, mask = batch()
    with pytest.raises(ValueError, match="weights: the pg loss takes no weights"):
        fastpmd.compute_loss(fastpmd.LossConfig(name="pg"), logp, old, adv, mask, weights=torch.ones(3))
