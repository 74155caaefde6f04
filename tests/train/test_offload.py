"""The phase switch: `model.offload_during_rollout` (params and optimizer state to host during rollout and back)
leaves training bit-identical, and `run.timeout_min` reaches the process group."""
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist


from fastpmd.train import distributed, offload
from fastpmd.train.cli import build_config
from fastpmd.train.distributed import init_distributed, shutdown_distributed
from fastpmd.train.trainer import Trainer

TINY = ["--preset", "tiny-arith", "--prompts-per-step", "8", "--group-size", "4", "--mini-batches", "2",
        "--warmup-steps", "2", "--max-new-tokens", "4", "--no-progress", "--no-export", "--no-plots",
        "--eval-n", "2", "--set", "data.eval_size=4", "--max-steps", "3"]


def _train(tmp_path, d, on):
    cfg, _ = build_config(TINY + ["--out", str(tmp_path / f"run{on}"), "--set", f"model.offload_during_rollout={on}"])
    tr = Trainer(cfg, d)
    rows = tr.fit()
    return tr, rows


def test_offload_during_rollout_runs_and_changes_nothing(tmp_path, world_of_one, monkeypatch):
    calls = []
    for name in ("optimizer_to_host", "reload"):
        orig = getattr(offload, name)
        monkeypatch.setattr(offload, name, lambda *a, _o=orig, _n=name: calls.append(_n) or _o(*a))
    off, rows_off = _train(tmp_path, world_of_one, False)
    assert calls == []
    on, rows_on = _train(tmp_path, world_of_one, True)
    assert calls.count("optimizer_to_host") == calls.count("reload") == 3 + 2  # 3 steps, evals at steps 0 and 3
    keys = ["reward_mean", "loss", "grad_norm", "logratio_mean", "entropy"]
    assert [[r[k] for k in keys] for r in rows_on] == [[r[k] for k in keys] for r in rows_off]
    for (n1, p1), (_, p2) in zip(off.policy.named_parameters(), on.policy.named_parameters()):
        assert torch.equal(p1.full_tensor(), p2.full_tensor()), n1
    for s1, s2 in zip(off.optimizer.state.values(), on.optimizer.state.values()):
        assert s1.keys() == s2.keys()
        for k in s1:
            a, b = s1[k], s2[k]
            assert a.device == b.device
            assert torch.equal(a.full_tensor() if hasattr(a, "full_tensor") else a,
                               b.full_tensor() if hasattr(b, "full_tensor") else b), k


def test_timeout_reaches_the_process_group(monkeypatch):
    seen = {}
    real = dist.init_process_group
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: seen.update(kw) or real(**kw))
    init_distributed("cpu", timeout_min=7)
    try:
        assert seen["timeout"] == timedelta(minutes=7)
    finally:
        shutdown_distributed()


def test_cpu_offload_runs_on_cpu_and_changes_nothing(tmp_path, world_of_one):
    """FSDP2 CPUOffloadPolicy (model.cpu_offload): a no-op on a CPU run that must still train, bit-identically."""
    off, rows_off = _train(tmp_path, world_of_one, False)
    cfg, _ = build_config(TINY + ["--out", str(tmp_path / "cpu_offload"), "--set", "model.cpu_offload=True"])
    on = Trainer(cfg, world_of_one)
    from torch.distributed.fsdp import CPUOffloadPolicy

    states = [m._get_fsdp_state() for m in on.policy.modules() if hasattr(m, "_get_fsdp_state")]
    groups = [s._fsdp_param_group for s in states if s._fsdp_param_group is not None]
    assert len(groups) == 1 + len(on.hf.model.layers)  # every FSDP unit offloads
    assert all(isinstance(g.offload_policy, CPUOffloadPolicy) for g in groups)
    rows_on = on.fit()
    keys = ["reward_mean", "loss", "grad_norm", "logratio_mean"]
    assert [[r[k] for k in keys] for r in rows_on] == [[r[k] for k in keys] for r in rows_off]


def test_cpu_offload_and_offload_during_rollout_exclude_each_other():
    from fastpmd.train.config import validate

    cfg, _ = build_config(TINY + ["--set", "model.cpu_offload=True", "--set", "model.offload_during_rollout=True"])
    with pytest.raises(ValueError, match="model.offload_during_rollout"):
        validate(cfg)


@pytest.mark.parametrize("field, value", [("optim.micro_batch_tokens", -1), ("run.timeout_min", 0),
                                          ("loss.rollout_correction", "'is'"), ("loss.rollout_is_cap", 0.0)])
def test_new_fields_are_validated(field, value):
    from fastpmd.train.config import validate

    with pytest.raises(ValueError, match=field.replace(".", r"\.")):  # at build (loss) or in validate (others)
        validate(build_config(TINY + ["--set", f"{field}={value}"])[0])


def test_tis_refuses_pg():

    with pytest.raises(ValueError, match="not 'pg'"):
        build_config(TINY + ["--loss", "pg", "--set", "loss.rollout_correction=tis"])
